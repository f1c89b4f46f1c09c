"""Tensors above 2^31 elements: 64-bit chunk planning and indexing, without (and with) the memory.

* The chunk planner's arithmetic at sizes above 2^31 and 2^32, on rp_tensor structs with NULL
  pointers: nothing is allocated.
* rp_adam_step on tensors of 2^32 + 8205 elements whose arrays are address space reserved with
  MAP_NORESERVE: only the few windows the chunks name are ever touched, so pointer offsets
  above 2^31 and 2^32 are exercised with a few MB of memory.
* A real step of a 2^31 + 13 element tensor through roundpipe.optim.Adam, compared with torch
  fused window by window. It needs ~35 GB and is skipped on smaller hosts.
"""

from __future__ import annotations

import mmap

import numpy as np
import pytest
import torch

from conftest import assert_bits_equal, run_python

from roundpipe import _build
from roundpipe.optim import adam as rp_adam

KERNEL = _build.load_kernel()  # ImportError here when it fails: conftest sets ROUNDPIPE_REQUIRE_NATIVE=1

BIG_SIZES = [2**31 - 1, 2**31, 2**31 + 1, 0, 5, 2**32 + 17, 3 * 2**31 + 5]


def _plan(sizes, chunk_elems, capacity=None, extra=0):
    ffi, lib = KERNEL.ffi, KERNEL.lib
    tensors = ffi.new("rp_tensor[]", len(sizes))  # zeroed: every pointer NULL
    for t, n in zip(tensors, sizes, strict=True):
        t.numel = n
    count = lib.rp_plan_chunks(tensors, len(sizes), chunk_elems, ffi.NULL, 0)
    cap = count if capacity is None else capacity
    out = ffi.new("rp_chunk[]", cap + extra)
    raw = np.frombuffer(ffi.buffer(out), dtype=np.int64).reshape(-1, 3)
    raw[:] = -7  # a canary in every slot
    again = lib.rp_plan_chunks(tensors, len(sizes), chunk_elems, out, cap)
    return count, again, raw.copy()


def _check_plan(sizes, chunk_elems, chunks):
    """The chunks cover each tensor exactly once, in order, in spans of at most chunk_elems."""
    tensor = chunks[:, 0]
    assert (np.diff(tensor) >= 0).all()
    step = None
    for i, n in enumerate(sizes):
        mine = chunks[tensor == i]
        if n == 0:
            assert len(mine) == 0
            continue
        b, e = mine[:, 1], mine[:, 2]
        assert b[0] == 0 and e[-1] == n, (i, n, b[0], e[-1])
        assert (b[1:] == e[:-1]).all(), f"tensor {i}: gaps or overlaps"
        sizes_i = e - b
        assert (sizes_i > 0).all() and (sizes_i <= chunk_elems).all()
        assert (sizes_i[:-1] == sizes_i[0]).all(), "all chunks but the last have one size"
        assert (b % 16 == 0).all(), "chunks start on 64-byte boundaries (adam.h)"
        step = int(sizes_i[0]) if len(sizes_i) > 1 else step
        # numel / chunk size in 64-bit: the count of a 2^32+ tensor's chunks
        if step:
            assert len(mine) == -(-n // step)
    return step


@pytest.mark.parametrize("sizes,chunk_elems", [
    (BIG_SIZES, rp_adam.CHUNK_ELEMS), (BIG_SIZES, 1 << 20), (BIG_SIZES, 3 * 2**20 + 5),
    ([1, 31, 32, 33, 1000, 0, 4097], 1), ([1, 31, 32, 33, 1000, 0, 4097], 1000),
])
def test_chunk_planner_above_2_31(sizes, chunk_elems):
    count, again, chunks = _plan(sizes, chunk_elems)
    assert again == count == len(chunks)
    step = _check_plan(sizes, max(chunk_elems, 32), chunks)
    # the cut: a whole number of cache lines, no more than asked (at least 32 elements)
    assert step is not None and step <= max(chunk_elems, 32) and step > max(chunk_elems, 32) - 32
    assert count == sum(-(-n // step) for n in sizes)


@pytest.mark.parametrize("chunk_elems", [2**31 + 40, 2**32 + 7, 2**40])
def test_chunk_planner_with_chunks_above_2_31(chunk_elems):
    sizes = [2**33 + 3, 2**31 + 1, 7, 2**32]
    count, again, chunks = _plan(sizes, chunk_elems)
    assert again == count == len(chunks)
    _check_plan(sizes, chunk_elems, chunks)
    for i, n in enumerate(sizes):  # chunk sizes above 2^31 are not truncated to 32 bits
        spans = chunks[chunks[:, 0] == i]
        assert spans[0, 2] - spans[0, 1] == min(n, chunk_elems - chunk_elems % 32)


def test_chunk_planner_honours_capacity():
    sizes = [2**32 + 17, 2**31 + 1]
    count, _, full = _plan(sizes, rp_adam.CHUNK_ELEMS)
    for cap in (0, 1, 262145, count - 1):
        c2, again, part = _plan(sizes, rp_adam.CHUNK_ELEMS, capacity=cap, extra=4)
        assert c2 == count and again == count  # the count, whatever the capacity
        assert (part[:cap] == full[:cap]).all()
        assert (part[cap:] == -7).all(), "wrote past the capacity"


# ---- rp_adam_step on address space above 2^32, touching only windows ---------------------

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux value; not exported by Python < 3.13
N = 2**32 + 8205  # N % 8 = 5: torch's scalar tail covers the last 5 elements
WINDOWS = [(0, 4096), (2**31 - 2048, 2**31 + 2048), (2**32 - 2048, 2**32 + 2048), (N - 4101, N)]
GUARD = 16


def _reserve(n_elems):
    try:
        return mmap.mmap(-1, n_elems * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, OverflowError, ValueError) as e:
        pytest.skip(f"cannot reserve {n_elems * 4 / 2**30:.0f} GiB of address space: {e}")


def _window(mm, b, e):
    return torch.frombuffer(mm, dtype=torch.float32, count=e - b, offset=b * 4)


@pytest.mark.skipif(not hasattr(mmap, "MAP_ANONYMOUS"), reason="needs anonymous mmap")
def test_step_indexes_above_2_32_in_reserved_address_space():
    import warnings
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    ffi, lib = KERNEL.ffi, KERNEL.lib
    names = ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    maps = {k: _reserve(N) for k in names}
    gen = torch.Generator().manual_seed(0)
    view = {k: [_window(maps[k], b, e) for b, e in WINDOWS] for k in names}
    spans = [(b - GUARD, b) for b, _ in WINDOWS if b > 0] + [(e, e + GUARD) for _, e in WINDOWS if e < N]
    guards = {k: [_window(maps[k], b, e) for b, e in spans] for k in names}
    for k in names:
        for w in guards[k]:
            w.fill_(7.0)
    for w in view["param"]:
        w.copy_(torch.randn(w.shape, generator=gen))

    step = torch.zeros((), dtype=torch.float32)
    tensors = ffi.new("rp_tensor[]", 1)
    t = tensors[0]
    t.param = ffi.cast("void *", view["param"][0].data_ptr())  # window 0 starts at element 0
    t.grad = ffi.cast("void *", view["grad"][0].data_ptr())
    for j, k in enumerate(names[2:]):  # Adam's state slots: exp_avg, exp_avg_sq, max_exp_avg_sq
        t.state[j] = ffi.cast("void *", view[k][0].data_ptr())
    t.step = ffi.cast("float *", step.data_ptr())
    t.numel = N
    chunks = ffi.new("rp_chunk[]", len(WINDOWS))
    for c, (b, e) in zip(chunks, WINDOWS, strict=True):
        c.tensor, c.begin, c.end = 0, b, e
    h = ffi.new("rp_adam_hyper *")
    h.lr, h.beta1, h.beta2, h.eps, h.weight_decay = 1e-2, 0.9, 0.999, 1e-8, 0.1
    h.amsgrad, h.maximize, h.decoupled_weight_decay = 1, 0, 0
    run = ffi.new("rp_run_opts *")
    run.num_threads, run.serial_below, run.torch_vec = 2, 0, rp_adam._TORCH_VEC

    # torch fused on each window alone: the windows start on multiples of 8, so torch's vector
    # loop and scalar tail see the same elements as in the whole tensor
    refs = [w.clone().requires_grad_() for w in view["param"]]
    ref_opts = [torch.optim.Adam([r], lr=1e-2, amsgrad=True, weight_decay=0.1, fused=True) for r in refs]
    for _ in range(3):
        for w, r in zip(view["grad"], refs, strict=True):
            w.copy_(torch.randn(w.shape, generator=gen))
            r.grad = w.clone()
        assert lib.rp_adam_step(run, h, tensors, 1, chunks, len(WINDOWS)) == 1
        for o in ref_opts:
            o.step()
    assert step.item() == 3.0
    for i, (r, o) in enumerate(zip(refs, ref_opts, strict=True)):
        where = f"window {WINDOWS[i]}"
        assert_bits_equal(view["param"][i], r, f"param {where}")
        for k in names[2:]:
            assert_bits_equal(view[k][i], o.state[r][k], f"{k} {where}")
    for k in names:  # nothing outside the chunks was written
        for w, span in zip(guards[k], spans, strict=True):
            assert (w == 7.0).all(), f"{k}: written outside the chunks, at {span}"


# ---- a real step above 2^31 elements -------------------------------------------------------


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


BIG_STEP_SCRIPT = r"""
import time, torch
import roundpipe.optim as rpo
N = 2**31 + 13                      # torch's scalar tail: the last 5 elements
W = 4096
# windows starting on multiples of 8 (torch's vector width), the last one ending at N
WINDOWS = [(0, W), (2**31 - W, 2**31 + W), (N - (W + 5), N)]
t0 = time.time()
p = torch.empty(N)
g = torch.empty(N)
torch.arange(N, out=p).mul_(1e-3).sin_()   # deterministic and parallel: no 2^31 randn
refs = [p[b:e].clone().requires_grad_() for b, e in WINDOWS]
last = p[-5:].clone()
p.requires_grad_()
opt = rpo.Adam([p], lr=1e-2, weight_decay=0.1)
ref_opts = [torch.optim.Adam([r], lr=1e-2, weight_decay=0.1, fused=True) for r in refs]
for s in range(2):
    torch.arange(N, out=g).mul_(0.37 + s).cos_()
    p.grad = g
    opt.step()
    for (b, e), r, o in zip(WINDOWS, refs, ref_opts):
        r.grad = g[b:e].clone()
        o.step()
bad = []
for (b, e), r, o in zip(WINDOWS, refs, ref_opts):
    pairs = [("param", p.detach()[b:e], r.detach())]
    pairs += [(k, opt.state[p][k][b:e], o.state[r][k]) for k in ("exp_avg", "exp_avg_sq")]
    for name, x, y in pairs:
        if not torch.equal(x.view(torch.int32), y.view(torch.int32)):
            bad.append(f"{name} [{b}, {e})")
changed = not torch.equal(p.detach()[-5:], last)
print("RESULT", "OK" if not bad and changed else f"FAIL {bad} changed={changed}",
      f"native={rpo.native_available()} threads={torch.get_num_threads()} seconds={time.time() - t0:.1f}")
"""


@pytest.mark.skipif(_available_bytes() < 40 * 2**30,
                    reason="a 2^31-element step needs ~35 GB of memory (4 fp32 arrays of 8.6 GB)")
def test_real_step_above_2_31_elements_matches_torch_windows():
    res = run_python(BIG_STEP_SCRIPT, timeout=900)
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT")), "")
    print(line)
    assert res.returncode == 0 and line.startswith("RESULT OK"), res.stdout + res.stderr

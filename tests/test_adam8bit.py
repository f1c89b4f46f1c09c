"""Adam8bit and AdamW8bit (issue 26): block-wise 8-bit moments.

The kernel's step is torch's fused fp32 step on the decoded moments followed by quant8.h's
encoding; the torch fallback computes exactly that with torch ops, so most tests compare
the kernel with the fallback (run in this process on an optimizer whose kernel is unset)
bit for bit, and the fallback with torch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from conftest import assert_bits_equal

import roundpipe.optim as rpo
from roundpipe import _build
from roundpipe.optim.adam8bit import CODE_KEYS, FP32_KEYS, decode, encode

# a tensor under min_8bit_size (fp32 moments), an 8-bit one with a short last block, and one
# big enough for two threads (SERIAL_BELOW) whose numel is not a multiple of 8 (torch's tail)
SHAPES = [(300,), (70, 83), (40000,), (3, 11, 701)]


def _params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def _grads(n: int, dtype: torch.dtype = torch.float32, seed: int = 1, scale: float = 1.0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[(torch.randn(s, generator=gen) * scale * torch.exp(torch.randn(s, generator=gen))).to(dtype)
             for s in SHAPES] for _ in range(n)]


def _fallback(opt: rpo.Adam8bit) -> rpo.Adam8bit:
    """opt stepping through the torch fallback, as on a host without a compiler."""
    opt._kernel = None
    return opt


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]],
         step: Callable[[torch.optim.Optimizer], Any] | None = None) -> None:
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        if step is None:
            opt.step()
        else:
            step(opt)


def _assert_same(a: rpo.Adam8bit, pa: list[torch.Tensor], b: rpo.Adam8bit, pb: list[torch.Tensor]) -> None:
    for i, (x, y) in enumerate(zip(pa, pb, strict=True)):
        assert_bits_equal(x.detach(), y.detach(), f"param {i}")
        sa, sb = a.state[x], b.state[y]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert_bits_equal(sa[k], sb[k], f"param {i} state[{k!r}]")


def _kernel_codec() -> Any:
    return _build.load_kernel("adam8bit")


def _kernel_encode(x: torch.Tensor, block: int, sq: bool) -> tuple[torch.Tensor, torch.Tensor]:
    k = _kernel_codec()
    x = x.contiguous()
    codes = torch.zeros(x.numel(), dtype=torch.uint8)
    absmax = torch.zeros(-(-x.numel() // block))
    k.lib.rp_q8_encode_blocks(k.ffi.cast("float *", x.data_ptr()), x.numel(), block, int(sq),
                              k.ffi.cast("uint8_t *", codes.data_ptr()), k.ffi.cast("float *", absmax.data_ptr()))
    return codes, absmax


def _kernel_decode(codes: torch.Tensor, absmax: torch.Tensor, block: int, sq: bool) -> torch.Tensor:
    k = _kernel_codec()
    x = torch.zeros(codes.numel())
    k.lib.rp_q8_decode_blocks(k.ffi.cast("float *", x.data_ptr()), codes.numel(), block, int(sq),
                              k.ffi.cast("uint8_t *", codes.data_ptr()), k.ffi.cast("float *", absmax.data_ptr()))
    return x


# ---- the codec ---------------------------------------------------------------------


@pytest.mark.parametrize("block", [16, 64, 256])
def test_fallback_codec_gives_the_kernels_codes(block):
    gen = torch.Generator().manual_seed(3)
    n = block * 12
    x = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 8)
    x[:block] = 0.0  # an all-zero block
    x[block:2 * block] *= 1e-38  # subnormal values: a tiny block, pre-scaled
    x[2 * block:3 * block] *= 1e-30
    x[3 * block:4 * block] = torch.randint(-300, 300, (block,), generator=gen).float() / 256  # rounding ties
    x[4 * block:5 * block] = 1e-44
    x[5 * block + 1] = 2.0 ** -149
    x[6 * block:7 * block] = torch.randn(block, generator=gen) * 1e-20
    x = torch.cat([x, torch.randn(block // 2 + 3, generator=gen)])  # a short last block
    for sq in (False, True):
        v = x.abs() if sq else x
        codes, absmax = _kernel_encode(v, block, sq)
        ref_codes, ref_absmax = encode(v, block, sq)
        assert_bits_equal(codes, ref_codes, f"codes sq={sq}")
        assert_bits_equal(absmax, ref_absmax, f"absmax sq={sq}")
        decoded = _kernel_decode(codes, absmax, block, sq)
        assert_bits_equal(decoded, decode(ref_codes, ref_absmax, block, sq), f"decoded sq={sq}")
        if sq:  # the zero-point rule: a non-zero exp_avg_sq never decodes to 0
            assert not ((v > 0) & (decoded == 0)).any()
        # 3 bits of relative precision where the code is an fp16 normal number
        scale = absmax.repeat_interleave(block)[: v.numel()]
        normal = v.abs() >= scale * (2.0 ** -14 if not sq else 2.0 ** -29)
        rel = ((decoded - v).abs() / v.abs())[normal & (v != 0)]
        assert rel.max().item() <= 1.0 / 16


# ---- the step -------------------------------------------------------------------------


@pytest.mark.parametrize("cls,kw", [
    (rpo.AdamW8bit, {}),
    (rpo.Adam8bit, {"weight_decay": 0.1, "maximize": True}),
    (rpo.AdamW8bit, {"block_size": 64, "betas": (0.8, 0.99), "lr": torch.tensor(3e-3)}),
])
def test_kernel_and_fallback_step_identically(cls, kw):
    grads = _grads(4)
    pa, pb = _params(), _params()
    a = cls(pa, **kw)
    b = _fallback(cls(pb, **kw))
    _run(a, pa, grads)
    _run(b, pb, grads)
    _assert_same(a, pa, b, pb)
    assert set(a.state[pa[0]]) == {"step", *FP32_KEYS}
    assert set(a.state[pa[1]]) == {"step", *CODE_KEYS}


def test_small_tensors_step_as_torch_adamw():
    """Params under min_8bit_size keep fp32 moments and torch's fused step, bit for bit."""
    grads = _grads(3)
    pa, pb = _params(), _params()
    a = rpo.AdamW8bit(pa, lr=1e-2, min_8bit_size=10**9)
    b = torch.optim.AdamW(pb, lr=1e-2, fused=True)
    _run(a, pa, grads)
    _run(b, pb, grads)
    for x, y in zip(pa, pb, strict=True):
        assert_bits_equal(x.detach(), y.detach())
        assert_bits_equal(a.state[x]["exp_avg_sq"], b.state[y]["exp_avg_sq"])


def _regression(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], steps: int = 150) -> float:
    """A teacher-student MLP on one thread (tiny matrices: threads only add overhead); the final loss."""
    torch.manual_seed(0)
    x = torch.randn(128, 32)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    with torch.no_grad():
        y = teacher(x)
    torch.manual_seed(1)
    student = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    opt = make(list(student.parameters()))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            loss = ((student(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(before)
    return loss.item()


def test_quality_within_5_percent_of_fp32_adamw():
    ref = _regression(lambda ps: torch.optim.AdamW(ps, lr=3e-3))
    # min_8bit_size=0 and small blocks: every tensor, biases included, is 8-bit
    ours = _regression(lambda ps: rpo.AdamW8bit(ps, lr=3e-3, min_8bit_size=0, block_size=64))
    assert ours <= ref * 1.05, (ours, ref)
    assert ours < 0.2 * _regression(lambda ps: torch.optim.SGD(ps, lr=0.0))  # and it did train


@pytest.mark.parametrize("grad", [0.0, 1e-20])
@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_no_nan_or_inf_where_fp32_adamw_has_none(grad, eps):
    p32 = [torch.nn.Parameter(torch.randn(8192))]
    p8 = [torch.nn.Parameter(p32[0].detach().clone())]
    ref = torch.optim.AdamW(p32, eps=eps)
    ours = rpo.AdamW8bit(p8, eps=eps)
    grads = [[torch.full((8192,), grad) * torch.sign(torch.randn(8192))] for _ in range(5)]
    _run(ref, p32, grads)
    _run(ours, p8, grads)
    assert torch.equal(torch.isfinite(p8[0]), torch.isfinite(p32[0]))
    for key in CODE_KEYS[1::2]:
        assert torch.isfinite(ours.state[p8[0]][key]).all()
    if torch.isfinite(p32[0]).all():  # 5 steps of at most lr = 1e-3 each, 8-bit moments off by a few %
        torch.testing.assert_close(p8[0].detach(), p32[0].detach(), rtol=0, atol=1e-6 if eps else 5e-4)


def test_results_do_not_depend_on_the_thread_count():
    grads = _grads(3)
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ps = _params()
            opt = rpo.AdamW8bit(ps)
            _run(opt, ps, grads)
            runs.append((opt, ps))
    finally:
        torch.set_num_threads(before)
    _assert_same(runs[0][0], runs[0][1], runs[1][0], runs[1][1])


# ---- checkpoints ------------------------------------------------------------------


def test_state_dict_round_trip_resumes_bit_identically():
    grads = _grads(5)
    pa = _params()
    a = rpo.AdamW8bit(pa, block_size=128)
    _run(a, pa, grads[:2])
    saved = copy.deepcopy(a.state_dict())
    pb = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    b = rpo.AdamW8bit(pb, block_size=128)
    b.load_state_dict(saved)
    assert b.state[pb[1]]["exp_avg_code"].dtype == torch.uint8
    _run(a, pa, grads[2:])
    _run(b, pb, grads[2:])
    _assert_same(a, pa, b, pb)


def test_a_torch_adamw_checkpoint_loads_quantized():
    grads = _grads(3)
    pt = _params()
    torch_opt = torch.optim.AdamW(pt, lr=1e-2)
    _run(torch_opt, pt, grads[:2])
    pa = [torch.nn.Parameter(p.detach().clone()) for p in pt]
    ours = rpo.AdamW8bit(pa, lr=1e-2)
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    for x, y in zip(pa, pt, strict=True):
        st, ref = ours.state[x], torch_opt.state[y]
        if "exp_avg_code" in st:
            for name, sq in (("exp_avg", False), ("exp_avg_sq", True)):
                codes, absmax = encode(ref[name], 256, sq)
                assert_bits_equal(st[f"{name}_code"], codes)
                assert_bits_equal(st[f"{name}_absmax"], absmax)
            assert "exp_avg" not in st
        else:
            assert_bits_equal(st["exp_avg"], ref["exp_avg"])
    _run(ours, pa, grads[2:])  # and it steps


def test_to_fp32_state_dict_resumes_in_torch_adamw():
    """torch's fused AdamW on the decoded moments is exactly our next step."""
    grads = _grads(3)
    pa = _params()
    ours = rpo.AdamW8bit(pa, lr=1e-2)
    _run(ours, pa, grads[:2])
    pt = [torch.nn.Parameter(p.detach().clone()) for p in pa]
    torch_opt = torch.optim.AdamW(pt, lr=1e-2)
    sd = ours.to_fp32_state_dict()
    assert "block_size" not in sd["param_groups"][0]
    assert sd["param_groups"][0]["fused"] is True  # torch resumes on the kernel our step reproduces
    torch_opt.load_state_dict(copy.deepcopy(sd))  # state_dict() shares the live state tensors, as torch's
    assert torch_opt.state[pt[1]]["exp_avg"].dtype == torch.float32
    _run(ours, pa, grads[2:])
    _run(torch_opt, pt, grads[2:])
    for x, y in zip(pa, pt, strict=True):
        assert_bits_equal(x.detach(), y.detach())


# ---- mixed precision, GradScaler, schedulers ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("master", [True, False])
def test_16bit_params_with_and_without_master_weights(dtype, master):
    grads = _grads(3, dtype)
    pa, pb = _params(dtype), _params(dtype)
    a = rpo.AdamW8bit(pa, master_weights=master)
    b = _fallback(rpo.AdamW8bit(pb, master_weights=master))
    _run(a, pa, grads)
    _run(b, pb, grads)
    _assert_same(a, pa, b, pb)
    if master:
        st = a.state[pa[2]]
        assert st["master_param"].dtype == torch.float32
        assert_bits_equal(pa[2].detach(), st["master_param"].to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grad_scaler_unscales_and_skips(dtype):
    grads = _grads(2, dtype, scale=1024.0)
    pa, pb = _params(dtype), _params(dtype)
    a = rpo.AdamW8bit(pa, master_weights=True)
    b = _fallback(rpo.AdamW8bit(pb, master_weights=True))
    scale, no_inf = torch.tensor(1024.0), torch.tensor(0.0)
    _run(a, pa, grads, lambda o: o.step(grad_scale=scale, found_inf=no_inf))
    _run(b, pb, grads, lambda o: o.step(grad_scale=scale, found_inf=no_inf))
    _assert_same(a, pa, b, pb)
    before = copy.deepcopy(a.state_dict())
    values = [p.detach().clone() for p in pa]
    _run(a, pa, grads[:1], lambda o: o.step(grad_scale=scale, found_inf=torch.tensor(1.0)))
    for p, v in zip(pa, values, strict=True):
        assert_bits_equal(p.detach(), v)
    after = a.state_dict()
    for pid, st in before["state"].items():
        for k, t in st.items():
            assert_bits_equal(after["state"][pid][k], t, k)


def test_lr_scheduler_and_tensor_lr():
    grads = _grads(3)
    pa, pb = _params(), _params()
    a = rpo.AdamW8bit(pa, lr=torch.tensor(1e-2))
    b = rpo.AdamW8bit(pb, lr=1e-2)
    sched_a = torch.optim.lr_scheduler.StepLR(a, step_size=1, gamma=0.5)
    sched_b = torch.optim.lr_scheduler.StepLR(b, step_size=1, gamma=0.5)
    _run(a, pa, grads, lambda o: (o.step(), sched_a.step()))
    _run(b, pb, grads, lambda o: (o.step(), sched_b.step()))
    _assert_same(a, pa, b, pb)
    assert float(a.param_groups[0]["lr"]) == pytest.approx(1e-2 / 8)


def test_memory_is_about_2_bytes_per_element_of_moments():
    p = torch.nn.Parameter(torch.randn(1 << 16))
    opt = rpo.AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    nbytes = sum(t.numel() * t.element_size() for k, t in opt.state[p].items() if k != "step")
    assert nbytes / p.numel() <= 2.1


# ---- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize("kw,error,match", [
    ({"block_size": 0}, ValueError, "block_size must be a positive multiple of 16 that divides 16384"),
    ({"block_size": 24}, ValueError, "multiple of 16"),
    ({"block_size": 48}, ValueError, "divides 16384"),
    ({"block_size": 256.0}, TypeError, "block_size must be an int"),
    ({"min_8bit_size": -1}, ValueError, "min_8bit_size must be >= 0"),
    ({"amsgrad": True}, ValueError, "no amsgrad variant"),
    ({"eps": None}, TypeError, "eps must be a real number"),
])
def test_bad_options_raise_before_anything_changes(kw, error, match):
    with pytest.raises(error, match=match):
        rpo.AdamW8bit(_params(), **kw)
    # the same value in a second group, at step time: nothing of group 0 moves
    ps = _params()
    opt = rpo.AdamW8bit([{"params": ps[:2]}, {"params": ps[2:]}])
    opt.param_groups[1].update(kw)
    values = [p.detach().clone() for p in ps]
    for p in ps:
        p.grad = torch.ones_like(p)
    with pytest.raises(error, match=match):
        opt.step()
    assert not opt.state
    for p, v in zip(ps, values, strict=True):
        assert_bits_equal(p.detach(), v)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_unsupported_param_dtypes_raise_naming_the_param(dtype):
    good = torch.nn.Parameter(torch.randn(5000))
    bad = torch.nn.Parameter(torch.randn(5000).to(dtype))
    opt = rpo.AdamW8bit([good, bad])
    good.grad, bad.grad = torch.ones_like(good), torch.ones_like(bad)
    with pytest.raises(TypeError, match=f"param group 0, param 1 has dtype {dtype}"):
        opt.step()
    assert not opt.state

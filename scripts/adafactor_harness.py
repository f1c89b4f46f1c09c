"""Adafactor against torch.optim.Adafactor: the full numerics matrix, and its speed and memory.

    python scripts/adafactor_harness.py              # numerics: every flag x shape, 1 and 2 threads
    python scripts/adafactor_harness.py --bench      # speed vs torch (default and foreach), roofline
    python scripts/adafactor_harness.py --memory     # state bytes against param bytes, GPT-2 small

Numerics, one step from the same state against torch 2.13 (foreach=False, on 1 thread: its
mean over 32768 rows or more depends on its thread count) and several steps of training: per param, the largest distance in ulps, whether every bit (NaN positions) is
torch's, and the state's largest relative error. Params that fit in one reduction chunk
(_engine.RCHUNK_ELEMS) must be torch's bits; bigger ones must stay within 2 ulps or 3e-4 of
the element's step (torch's own norm of millions of elements, one 8-lane chain, is about
that far from the exact sum: 1.3e-4 for 5 M normal floats), state within 1e-5. Also: 1 vs
2 threads and a state_dict round trip, bit for bit.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roundpipe.optim as rpo  # noqa: E402
from roundpipe import _build  # noqa: E402
from roundpipe.optim import _engine  # noqa: E402

SHAPES = [(7,), (), (1,), (67,), (3, 5), (1, 9), (9, 1), (1, 1), (17, 33), (4, 3, 5), (2, 3, 4, 5), (3, 1, 7),
          (5, 2, 1), (2, 70), (33000,), (200, 300), (3, 40000), (50000, 1)]
BIG = [(3000, 1500), (5_000_000,), (2, 2100, 1000)]  # over one reduction chunk
FLAGS = [dict(zip(("maximize", "weight_decay", "eps", "d", "lr", "beta2_decay"), v, strict=True)) for v in
         itertools.product((False, True), (0.0, 0.1), ((None, 1e-3), (1e-30, 0.5), (0.0, 0.0)), (1.0, 3.0),
                           (0.05, 2.0), (-0.8, 0.0))]


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.detach().contiguous().view(torch.int32).long()
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    d = (ordered(a) - ordered(b)).abs()
    d[torch.isnan(a) & torch.isnan(b)] = 0
    d[torch.isnan(a) ^ torch.isnan(b)] = 1 << 40
    return int(d.max()) if d.numel() else 0


def grads_for(shapes: list[tuple[int, ...]], step: int, special: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    out = []
    for k, s in enumerate(shapes):
        g = torch.randn(s, generator=gen) * (10.0 ** (k % 5 - 2))
        if special and g.numel() > 4:
            flat = g.view(-1)
            flat[0], flat[1], flat[2], flat[3] = float("nan"), float("inf"), 0.0, 1e-30
        out.append(g)
    return out


def one_matrix(shapes: list[tuple[int, ...]], flags: dict, steps: int, special: bool, threads: int,
               torch_threads: int = 1, bound: float = 1e-6) -> dict:
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=gen) for s in shapes]
    ours = [t.clone().requires_grad_() for t in init]
    ref = [t.clone().requires_grad_() for t in init]
    oa, ob = rpo.Adafactor(ours, **flags), torch.optim.Adafactor(ref, foreach=False, **flags)
    worst: dict = {"ulps": 0, "state_rel": 0.0, "exact": 0, "params": 0, "bound_ok": True}
    for step in range(steps):
        for x, y, g in zip(ours, ref, grads_for(shapes, step, special), strict=True):
            x.grad, y.grad = g.clone(), g.clone()
        before = [y.detach().clone() for y in ref]
        torch.set_num_threads(threads)
        oa.step()
        torch.set_num_threads(torch_threads)  # torch's mean over >= 32768 rows depends on its thread count
        ob.step()
        torch.set_num_threads(2)
        for x, y, y0 in zip(ours, ref, before, strict=True):
            x_, y_ = x.detach(), y.detach()
            u = ulps(x_, y_)
            worst["ulps"] = max(worst["ulps"], u)
            worst["params"] += 1
            worst["exact"] += u == 0
            ulp = torch.nextafter(y_.abs(), torch.tensor(float("inf"))) - y_.abs()
            both_nan = torch.isnan(x_) & torch.isnan(y_)
            ok = ((x_ - y_).abs() <= 2 * ulp + bound * (y_ - y0).abs()) | both_nan
            worst["bound_ok"] &= bool(ok.all())
            excess = ((x_ - y_).abs() - 2 * ulp).clamp_min(0) / (y_ - y0).abs()
            excess = excess[~both_nan & (excess > 0)]
            worst["step_rel"] = max(worst.get("step_rel", 0.0), float(excess.max()) if excess.numel() else 0.0)
            for key, t in ob.state[y].items():
                if key == "step":
                    continue
                s = oa.state[x][key]
                rel = ((s - t).abs() / t.abs()).nan_to_num(0.0, posinf=0.0)
                worst["state_rel"] = max(worst["state_rel"], float(rel.max()) if rel.numel() else 0.0)
                s.copy_(t)  # the next step starts from the same state
            x.data.copy_(y)
    return worst


def numerics(args: argparse.Namespace) -> int:
    failures = 0
    total = {"exact": 0, "params": 0}
    for threads in (1, 2):
        for special in (False, True):
            for flags in FLAGS[:: args.every]:
                w = one_matrix(SHAPES, flags, 2, special, threads)
                total["exact"] += w["exact"]
                total["params"] += w["params"]
                bad = w["ulps"] != 0 or w["state_rel"] > 0
                failures += bad
                if bad or args.verbose:
                    print(f"small threads={threads} special={special} {flags}: {w}")
    print(f"small shapes: {total['exact']} of {total['params']} params bit-identical to torch on 1 thread, "
          f"{failures} failures")
    w = one_matrix(SHAPES, {"weight_decay": 0.1}, 2, False, 2, torch_threads=2)
    print(f"against torch on 2 threads: {w['exact']} of {w['params']} bit-identical (torch's mean over the "
          f"50000 rows of (50000, 1) is split by its thread count); within the bound: {w['bound_ok']}, "
          f"state within {w['state_rel']:.2e}")
    big_fail = 0
    for threads in (1, 2):
        w = one_matrix(BIG, {"weight_decay": 0.1}, 2, False, threads, bound=3e-4)
        ok = w["bound_ok"] and w["state_rel"] <= 1e-5
        big_fail += not ok
        print(f"over one chunk, threads={threads}: largest {w['ulps']} ulps; beyond 2 ulps, at most "
              f"{w['step_rel']:.1e} of the element's step (bound 3e-4: {w['bound_ok']}); "
              f"state within {w['state_rel']:.2e}")
    same = thread_and_resume_identity()
    print(f"1 vs 2 threads and a state_dict round trip, bit for bit: {same}")
    return 1 if failures or big_fail or not same else 0


def thread_and_resume_identity() -> bool:
    def run(threads: int, resume: bool) -> list[torch.Tensor]:
        torch.set_num_threads(threads)
        gen = torch.Generator().manual_seed(2)
        ps = [torch.randn(s, generator=gen).requires_grad_() for s in BIG]
        opt = rpo.Adafactor(ps, weight_decay=0.1)
        for step in range(3):
            if resume and step == 2:
                sd = copy.deepcopy(opt.state_dict())
                opt = rpo.Adafactor(ps, weight_decay=0.1)
                opt.load_state_dict(sd)
            for p, g in zip(ps, grads_for(BIG, step, False), strict=True):
                p.grad = g
            opt.step()
        torch.set_num_threads(2)
        return [p.detach().clone() for p in ps] + [t for p in ps for t in opt.state[p].values()]
    one = run(1, False)
    return all(all(torch.equal(a.view(torch.int32) if a.dtype == torch.float32 else a, b.view(torch.int32)
                               if b.dtype == torch.float32 else b) for a, b in zip(one, other, strict=True))
               for other in (run(2, False), run(2, True)))


def gpt2_shapes(layers: int = 12, d: int = 768, vocab: int = 50257, ctx: int = 1024) -> list[tuple[int, ...]]:
    from bench import transformer_shapes
    return transformer_shapes(layers=layers, d=d, vocab=vocab, ctx=ctx, mlp=4)


def memory(args: argparse.Namespace) -> int:
    shapes = gpt2_shapes()
    params = [torch.zeros(s, requires_grad=True) for s in shapes]
    opt = rpo.Adafactor(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    pbytes = sum(p.numel() * p.element_size() for p in params)
    sbytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values())
    print(f"GPT-2 small ({sum(p.numel() for p in params) / 1e6:.1f} M params): param {pbytes / 2**20:.1f} MiB, "
          f"Adafactor state {sbytes / 2**20:.2f} MiB = {100 * sbytes / pbytes:.2f} % of param bytes "
          f"(fp32 Adam: 200 %)")
    return 0 if sbytes < 0.01 * pbytes else 1


def bench(args: argparse.Namespace) -> int:
    from bench import transformer_shapes
    torch.set_num_threads(args.threads)
    shapes = transformer_shapes(layers=2, d=1024, vocab=8000, ctx=1024, mlp=4)
    n = sum(torch.Size(s).numel() for s in shapes)

    def make() -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        return ps
    opts = {
        "roundpipe": rpo.Adafactor(make()),
        "torch default (foreach=False)": torch.optim.Adafactor(make(), foreach=False),
        "torch foreach=True": torch.optim.Adafactor(make(), foreach=True),
        "torch Adam fused": torch.optim.Adam(make(), fused=True),
    }
    kernel = _build.load_kernel("adafactor")
    ffi = kernel.ffi
    a, b = torch.randn(n), torch.randn(n)
    sums = ffi.new("float[]", n // 16384 + 1)

    def probe() -> None:
        kernel.lib.rp_roofline_probe_adafactor(ffi.cast("float *", a.data_ptr()), ffi.cast("float *", b.data_ptr()),
                                               sums, n, args.threads)
    runs = {**{k: o.step for k, o in opts.items()}, "roofline probe (24 B/el)": probe}
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeat):  # interleaved
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    print(f"transformer mix, {n / 1e6:.1f} M fp32 elements, {args.threads} threads, best of {args.repeat} interleaved")
    for k, t in best.items():
        print(f"  {k:32s} {t * 1e3:8.1f} ms")
    rp = best["roundpipe"]
    print(f"  speedup vs torch default {best['torch default (foreach=False)'] / rp:.1f}x, "
          f"vs foreach {best['torch foreach=True'] / rp:.1f}x; roofline fraction "
          f"{best['roofline probe (24 B/el)'] / rp:.2f} ({24 * n / rp / 1e9:.1f} GB/s moved)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--every", type=int, default=1, help="run every n-th flag combination")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if args.bench:
        return bench(args)
    if args.memory:
        return memory(args)
    print(f"reduction chunk: {_engine.RCHUNK_ELEMS} elements")
    return numerics(args)


if __name__ == "__main__":
    sys.exit(main())

"""Rough step times of Adamax and RAdam on one ~32M-element fp32 mix: roundpipe against torch's
default (foreach=False) and foreach=True, interleaved, median of a few steps each. A quick
look for a shared machine, not the bench (scripts/bench.py is that): numbers vary with load.

Usage: python scripts/for_loop_timing.py [reps]
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch

import roundpipe.optim as rpo

SHAPES = [(4096, 4096)] + [(4096, 1024)] * 3 + [(1024, 1024)] * 2 + [(1024,)] * 40  # ~31.5M elements


def make(cls: type, **kw: object) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(ps, lr=1e-3, **kw), ps


def main() -> None:
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    n = sum(torch.Size(s).numel() for s in SHAPES)
    print(f"{n / 1e6:.1f}M fp32 elements, {torch.get_num_threads()} threads, median of {reps} steps (ms); "
          "the engine's 28-byte roofline probe interleaved")
    run_probe = probe(n)
    rules = (("Adamax", rpo.Adamax, torch.optim.Adamax, 0), ("RAdam (steps 2-6, un-rectified)", rpo.RAdam,
             torch.optim.RAdam, 0), ("RAdam (from step 100, rectified)", rpo.RAdam, torch.optim.RAdam, 99))
    for name, ours, ref, start in rules:
        variants = {"roundpipe": make(ours)[0], "torch default": make(ref, foreach=False)[0],
                    "torch foreach": make(ref, foreach=True)[0]}
        times: dict[str, list[float]] = {k: [] for k in [*variants, "probe"]}
        for opt in variants.values():
            opt.step()  # state
            for st in opt.state.values():
                st["step"] += start
        for _ in range(reps):
            for k, opt in variants.items():
                t0 = time.perf_counter()
                opt.step()
                times[k].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_probe()
            times["probe"].append(time.perf_counter() - t0)
        roofline = statistics.median(times.pop("probe"))
        ours_ms = statistics.median(times["roundpipe"]) * 1e3
        row = ", ".join(f"{k} {statistics.median(v) * 1e3:.0f}" for k, v in times.items())
        gb = 28 * n / 1e9
        print(f"{name}: {row}; roundpipe {gb / (ours_ms / 1e3):.1f} GB/s at 28 B/element; "
              f"speed-up {statistics.median(times['torch default']) * 1e3 / ours_ms:.1f}x default, "
              f"{statistics.median(times['torch foreach']) * 1e3 / ours_ms:.1f}x foreach; "
              f"{roofline * 1e3 / ours_ms:.2f} of the roofline probe")
        del variants


def probe(n: int) -> Callable[[], None]:
    """One pass of the engine's 28-byte roofline probe (4 arrays read, 3 written) over n elements."""
    from roundpipe import _build

    kernel = _build.load_kernel()
    a, b, c, d = (torch.randn(n) for _ in range(4))
    f = kernel.ffi.cast
    args = (f("float *", a.data_ptr()), f("float *", b.data_ptr()), f("float *", c.data_ptr()),
            f("float *", d.data_ptr()), n, torch.get_num_threads())
    kernel.lib.rp_roofline_probe(*args)
    return lambda: kernel.lib.rp_roofline_probe(*args)


if __name__ == "__main__":
    main()

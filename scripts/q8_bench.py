"""AdamW8bit against roundpipe's fp32 AdamW, interleaved in one process, and where its time goes.

    python scripts/q8_bench.py [--mix layers=2,d=1024,vocab=8000,ctx=1024,mlp=4]
                                            [--threads 1,2] [--reps 7] [--bnb]

1. The step on a GPT-2-like mix (roundpipe.bench's transformer_shapes; the default is a
   smaller mix than the bench's, for a shared 2-core machine; its lowmem workload has the
   8-bit row too): each round steps every
   optimizer once, in turn, so that a noisy neighbour hits all of them alike; min and
   median over the rounds, and the ratio of medians.
2. Where the time goes, on one thread, in cache (256 Ki elements stepped over and over, so
   memory does not hide compute): the full step, decoding both moments, absmax and
   encoding both moments (rp_q8_decode_blocks / rp_q8_encode_blocks, the codec's own
   functions, each timed alone), and the fp32 AdamW step on the same elements (Adam's
   math alone), in ns per element.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's roundpipe

import roundpipe.optim as rpo  # noqa: E402
from roundpipe import _build  # noqa: E402
from roundpipe.bench.workloads import make_params, parse_config, transformer_shapes  # noqa: E402


def rounds(entries: dict[str, Any], reps: int, clock: Any = time.perf_counter) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in entries}
    for step in entries.values():  # warm-up: state, plans
        step()
    for _ in range(reps):
        for k, step in entries.items():
            t0 = clock()
            step()
            times[k].append(clock() - t0)
    return times


def mix_bench(args: argparse.Namespace) -> None:
    cfg = parse_config(args.mix, {"layers": 2, "d": 1024, "vocab": 8000, "ctx": 1024, "mlp": 4}, "--mix")
    shapes = transformer_shapes(**cfg)
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"mix {cfg}: {len(shapes)} tensors, {n / 1e6:.1f} M elements")
    p32, _ = make_params(shapes)
    p8, _ = make_params(shapes)
    entries: dict[str, Any] = {"fp32 AdamW": rpo.AdamW(p32, lr=1e-3).step, "AdamW8bit": rpo.AdamW8bit(p8, lr=1e-3).step}
    if args.bnb:
        import bitsandbytes as bnb  # optional: not a test dependency
        pb, _ = make_params(shapes)
        entries["bitsandbytes AdamW8bit"] = bnb.optim.AdamW8bit(pb, lr=1e-3).step
    before = torch.get_num_threads()
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        # one thread runs on this one (rp_run): its CPU time leaves out the time other
        # processes of a loaded machine hold the core
        clock = time.thread_time if threads == 1 else time.perf_counter
        times = rounds(entries, args.reps, clock)
        ref = statistics.median(times["fp32 AdamW"])
        for k, ts in times.items():
            med = statistics.median(ts)
            print(f"  {threads} thread(s) {'cpu ' if threads == 1 else 'wall'}  {k:24s} min {min(ts) * 1e3:8.1f} ms  median {med * 1e3:8.1f} ms"
                  f"  x{med / ref:.2f} of fp32 AdamW")
    torch.set_num_threads(before)


def breakdown(args: argparse.Namespace) -> None:
    k = _build.load_kernel("adam8bit")
    ffi, lib = k.ffi, k.lib
    n, block, inner = 1 << 18, 256, 20
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen) * 1e-3
    codes = torch.zeros(n, dtype=torch.uint8)
    absmax = torch.zeros(n // block)
    fp = ffi.cast("float *", x.data_ptr())
    cp = ffi.cast("uint8_t *", codes.data_ptr())
    ap = ffi.cast("float *", absmax.data_ptr())
    lib.rp_q8_encode_blocks(fp, n, block, 0, cp, ap)
    torch.set_num_threads(1)
    p8 = [torch.nn.Parameter(torch.randn(n, generator=gen))]
    p32 = [torch.nn.Parameter(torch.randn(n, generator=gen))]
    for p in p8 + p32:
        p.grad = torch.randn(n, generator=gen) * 1e-2
    o8, o32 = rpo.AdamW8bit(p8), rpo.AdamW(p32)

    def rep(fn: Any) -> Any:
        def run() -> None:
            for _ in range(inner):
                fn()
        return run

    entries = {
        "full 8-bit step": rep(o8.step),
        "decode (both moments)": rep(lambda: (lib.rp_q8_decode_blocks(fp, n, block, 0, cp, ap),
                                              lib.rp_q8_decode_blocks(fp, n, block, 1, cp, ap))),
        "absmax + encode (both)": rep(lambda: (lib.rp_q8_encode_blocks(fp, n, block, 0, cp, ap),
                                               lib.rp_q8_encode_blocks(fp, n, block, 1, cp, ap))),
        "fp32 AdamW step (math)": rep(o32.step),
    }
    times = rounds(entries, args.reps, time.thread_time)
    print(f"where the time goes: 1 thread, {n} elements in cache, ns of this thread's CPU time per element "
          f"(median of {args.reps}); each part timed alone, while the step runs the codec beside the "
          "divider-bound update (adam8bit.c, q8_fused), so the parts add up to more than the step")
    for name, ts in times.items():
        print(f"  {name:26s} {statistics.median(ts) / (inner * n) * 1e9:6.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mix", default="")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--bnb", action="store_true", help="add bitsandbytes' AdamW8bit (installed separately)")
    ap.add_argument("--no-breakdown", action="store_true")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"codec: {'AVX-512 (vcvtph2ps/vcvtps2ph)' if 'avx512bw' in _build.cpu_flags() else 'portable loops'}")
    mix_bench(args)
    if not args.no_breakdown:
        breakdown(args)


if __name__ == "__main__":
    main()

"""The engine's tuning knobs, measured: --sweep-serial, --chunk-sweep and --profile.

These are for roundpipe's developers: where one thread beats many
(``SERIAL_BELOW``), which ``CHUNK_ELEMS`` to choose, and where ``step()``
spends its Python time.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

import roundpipe.optim
import roundpipe.optim._engine as rp_engine

from . import progress
from .competitors import RooflineProbe
from .timing import POLICY, Entry, ForeignLoad, Result, free, median, run_rounds, summarize
from .workloads import LR, Workload, make_params, new_grads_hook

log = progress.log


@contextlib.contextmanager
def patched(name: str, value: Any) -> Iterator[None]:
    """Temporarily set roundpipe.optim._engine.<name> (read at step or plan time)."""
    old = getattr(rp_engine, name)
    setattr(rp_engine, name, value)
    try:
        yield
    finally:
        setattr(rp_engine, name, old)



# ---- serial threshold and chunk size sweeps --------------------------------------------------


def flush_cache(buf: Any) -> None:
    """Evict caches from this core with a single-threaded numpy pass (no OpenMP wake-up)."""
    buf += 1


def measure_serial_parallel(opt: Any, mode: str, inner: int, reps: int, flush: Any) -> dict[str, list[float]]:
    """Step times of `opt` forced serial and forced parallel, alternating, after 2 warm-up pairs."""
    times: dict[str, list[float]] = {"serial": [], "parallel": []}
    for r in range(reps + 2):
        for which in (("serial", "parallel") if r % 2 == 0 else ("parallel", "serial")):
            with patched("SERIAL_BELOW", (1 << 62) if which == "serial" else 0):
                if mode == "warm":
                    opt.step()  # same mode as the timed steps just before them
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        opt.step()
                    dt = (time.perf_counter() - t0) / inner
                else:
                    flush_cache(flush)
                    time.sleep(0.002)
                    t0 = time.perf_counter()
                    opt.step()
                    dt = time.perf_counter() - t0
            if r >= 2:
                times[which].append(dt)
    return times


def sweep_serial(args: argparse.Namespace) -> dict[str, Any]:
    """Step time, one thread against N, for group sizes 1K..1M: where should SERIAL_BELOW sit?

    Both modes use the same optimizer and the same kernel path; serial is forced
    with SERIAL_BELOW = 2**62 and parallel with SERIAL_BELOW = 0 at the thread
    count in force. 'warm': back-to-back steps (data in cache, OpenMP threads
    spinning). 'cold': each step after a single-threaded pass over 64 MB and a
    2 ms sleep, so caches are cold and the OpenMP threads have gone to sleep.
    """
    import numpy as np

    threads = torch.get_num_threads()
    sizes = [1 << k for k in range(10, 21)] if not args.small_run else [1 << 10, 1 << 14, 1 << 17]
    layouts = {"one tensor": lambda n: [(n,)], "1K-element tensors": lambda n: [(1024,)] * (n // 1024)}
    flush = np.zeros(16 << 20, dtype=np.float32)
    out: dict[str, Any] = {"threads": threads, "chunk_elems": rp_engine.CHUNK_ELEMS,
                           "serial_below_now": rp_engine.SERIAL_BELOW, "rows": []}
    log(f"[sweep-serial] sizes {sizes[0]}..{sizes[-1]}, 1 vs {threads} threads")
    reps = args.sweep_reps
    deadline = time.monotonic() + POLICY.retry_budget_s
    for layout, shapes_of in layouts.items():
        for n in sizes:
            params, _ = make_params(shapes_of(n))
            opt = roundpipe.optim.Adam(params, lr=LR)
            opt.step()
            ce = rp_engine.CHUNK_ELEMS
            chunks = sum(-(-q.numel() // ce) for q in params)
            row: dict[str, Any] = {"layout": layout, "numel": n, "tensors": len(params), "chunks": chunks}
            for mode in ("warm", "cold"):
                inner = max(1, min(200, (1 << 22) // n)) if mode == "warm" else 1
                while True:  # the block again while other processes disturbed it (within the budget)
                    load = ForeignLoad()
                    times = measure_serial_parallel(opt, mode, inner, reps, flush)
                    limit = POLICY.max_foreign
                    frac = load.fraction() if limit is not None else None
                    if frac is None or limit is None or frac <= limit:
                        break
                    if time.monotonic() > deadline:
                        row[f"{mode}_disturbed"] = True
                        break
                    POLICY.discarded += 1
                s, p = median(times["serial"]), median(times["parallel"])
                row[f"{mode}_serial_us"] = s * 1e6
                row[f"{mode}_parallel_us"] = p * 1e6
                row[f"{mode}_parallel_speedup"] = s / p
            out["rows"].append(row)
            del opt, params
    # Crossover: the smallest size from which parallel is at least 5% faster at
    # every larger size too. A group of one chunk runs on one thread whatever
    # SERIAL_BELOW says, so those rows cannot show a crossover.
    out["crossover"] = {}
    for layout in layouts:
        for mode in ("warm", "cold"):
            rows = [r for r in out["rows"] if r["layout"] == layout and r["chunks"] >= 2]
            cross = None
            for i, r in enumerate(rows):
                if all(q[f"{mode}_parallel_speedup"] > 1.05 for q in rows[i:]):
                    cross = r["numel"]
                    break
            out["crossover"][f"{layout}, {mode}"] = cross
    free()
    return out


def chunk_sweep(args: argparse.Namespace, workloads: list[Workload]) -> list[Result]:
    threads = torch.get_num_threads()
    choices = args.chunks
    out = []
    for w in workloads:
        log(f"[chunk-sweep {w.name}] CHUNK_ELEMS {choices}")
        params, _ = make_params(w.shapes)
        entries = []
        for c in choices:
            with patched("CHUNK_ELEMS", c):
                opt = roundpipe.optim.Adam(params, lr=LR)
                opt.step()  # the plan, with its chunk list, is built now and then cached
            entries.append(Entry(f"CHUNK_ELEMS={c}", opt.step, 28))
        roof = RooflineProbe(w.numel).entry()
        run_rounds(entries + ([roof] if roof else []), args.warmup, args.reps)
        out.append(summarize(f"chunk sweep: {w.name}", threads, w.numel, len(w.shapes), entries, roof,
                             f"current CHUNK_ELEMS={rp_engine.CHUNK_ELEMS}", ref=f"CHUNK_ELEMS={rp_engine.CHUNK_ELEMS}"
                             if rp_engine.CHUNK_ELEMS in choices else "roofline-probe"))
        del entries, roof, params
        free()
    return out


# ---- profile of roundpipe's Python path ----------------------------------------------------------


class _TimedLib:
    """Stands in for the cffi lib: times rp_adam_step, passes everything else through."""

    def __init__(self, lib: Any, clock: Callable[[], float]) -> None:
        self._lib = lib
        self._clock = clock
        self.c_time = 0.0

    def rp_adam_step(self, *a: Any) -> int:
        t0 = self._clock()
        r = self._lib.rp_adam_step(*a)
        self.c_time += self._clock() - t0
        return r

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)


class _TimedKernel:
    def __init__(self, k: Any, clock: Callable[[], float]) -> None:
        self.ffi = k.ffi
        self.lib = _TimedLib(k.lib, clock)


def profile_step(args: argparse.Namespace) -> str:
    """Where roundpipe's step() spends its time on the tiny and many-small workloads.

    Times are the calling thread's CPU time (time.thread_time), which other
    processes sharing the machine do not inflate; the C call's share is what
    the calling thread spent inside rp_adam_step (on more threads, the other
    threads' work is not in it).
    """
    lines = []
    cases = [("tiny", [(args.tiny,)], 20000 if not args.small_run else 500)]
    n_small = args.small_count if not args.small_run else 256
    cases.append(("many-small", [(args.small_size,)] * n_small, 100 if not args.small_run else 5))
    if not args.small_run:
        cases.append(("many-tiny", [(16,)] * 4096, 300))
    for fresh in (False, True):
        for name, shapes, steps in cases:
            params, sets = make_params(shapes, grad_sets=2)
            opt = roundpipe.optim.Adam(params, lr=LR)
            opt.step()
            before = new_grads_hook(params, sets)
            kernel = opt._kernel
            timed = _TimedKernel(kernel, time.thread_time) if kernel is not None else None
            if timed is not None:
                opt._kernel = timed  # type: ignore[assignment]  # stands in for the cffi module
            total = 0.0
            for r in range(steps):
                if fresh:
                    before(r)
                t0 = time.thread_time()
                opt.step()
                total += time.thread_time() - t0
            c_time = timed.lib.c_time if timed is not None else 0.0
            py = (total - c_time) / steps
            lines.append(f"\n=== {name}: {len(shapes)} tensor(s) x {shapes[0][0]} elements, "
                         f"{'FRESH grad tensors each step' if fresh else 'grads reused (plan cached)'}, "
                         f"{torch.get_num_threads()} threads ===")
            lines.append(f"step(), calling thread's CPU time: {total / steps * 1e6:.1f} us/step = "
                         f"C rp_adam_step {c_time / steps * 1e6:.1f} us + Python {py * 1e6:.1f} us "
                         f"({py / len(shapes) * 1e9:.0f} ns per tensor)")
            prof = cProfile.Profile(time.thread_time)
            prof.enable()
            for r in range(steps):
                if fresh:
                    before(r)
                opt.step()
            prof.disable()
            for key, count in (("tottime", 14), ("cumulative", 10)):
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats(key).print_stats(count)
                body = s.getvalue()
                start = body.find("   ncalls")
                lines.append(f"cProfile over {steps} steps (incl. the untimed grad swap), by {key}:")
                lines.append(body[start:].rstrip() if start >= 0 else body)
            opt._kernel = kernel
            del opt, params, sets
            free()
    return "\n".join(lines)



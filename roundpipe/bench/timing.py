"""How the bench times: interleaved rounds, medians, and what other processes did meanwhile.

Every competitor of a workload steps the same parameter and gradient tensors
(each keeps its own state). One round times one step of each competitor, in an
order that rotates every round, so that drift on a noisy machine hits all of
them alike; the first rounds are warm-up and the median of the others is
reported.

On a shared machine :class:`ForeignLoad` measures the share of the CPUs that
other processes used (``/proc/stat`` less this process's own CPU time).
With :attr:`Policy.max_foreign` set, a round in which they used more is timed
again, for at most :attr:`Policy.retry_budget_s` seconds per workload; rounds
kept after that are counted as disturbed.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import progress


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def free() -> None:
    """Collect the workload just measured before the next one allocates (one workload in memory at a time)."""
    gc.collect()


class ForeignLoad:
    """CPU time used by *other* processes over an interval, as a fraction of all CPUs.

    /proc/stat's busy time for the whole machine minus this process's own CPU
    time (all its threads). On a shared 2-core box a neighbour's test run can
    halve the bandwidth an optimizer sees; the table says when that happened.
    """

    HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def _busy_s() -> float | None:
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return (sum(vals[:8]) - idle) / ForeignLoad.HZ

    def __init__(self) -> None:
        self.t0, self.b0, self.own0 = time.perf_counter(), self._busy_s(), sum(os.times()[:2])

    def fraction(self) -> float | None:
        busy = self._busy_s()
        if busy is None or self.b0 is None:
            return None
        wall = time.perf_counter() - self.t0
        own = sum(os.times()[:2]) - self.own0
        return max(0.0, (busy - self.b0 - own) / (wall * (os.cpu_count() or 1)))


def wait_idle(max_wait: float, threshold: float = 0.05) -> float | None:
    """Wait (at most max_wait s) until other processes use under `threshold` of the CPUs for 1 s."""
    if max_wait <= 0:
        return None
    deadline = time.monotonic() + max_wait
    while True:
        probe = ForeignLoad()
        time.sleep(1.0)
        frac = probe.fraction()
        if frac is None or frac < threshold or time.monotonic() > deadline:
            return frac
        progress.log(f"  waiting for an idle machine: other processes use {frac:.0%} of the CPUs")


@dataclass
class Policy:
    """What run_rounds does with rounds that other processes disturbed (--max-foreign, --retry-budget)."""

    max_foreign: float | None = None  # None keeps every round
    retry_budget_s: float = 300.0  # per workload
    discarded: int = 0  # rounds timed again
    kept_disturbed: int = 0  # disturbed rounds kept when the budget ran out


POLICY = Policy()  # the run's; the CLI sets its fields


@dataclass
class Entry:
    """One competitor in one workload: its step function and what it moves per element."""

    name: str
    step: Callable[[], Any]
    bytes_per_elem: float
    before: Callable[[int], Any] | None = None  # untimed setup before timed step number r
    samples: list[float] = field(default_factory=list)
    disturbed: int = 0  # kept rounds during which other processes were busy (see run_rounds)


def run_rounds(entries: list[Entry], warmup: int, reps: int, inner: int = 1) -> int:
    """Time `inner` calls of each entry's step per round, rotating the order each round.

    With POLICY.max_foreign set, a round in which other processes were busy is
    thrown away and run again until POLICY.retry_budget_s is spent; after that
    disturbed rounds are kept. Returns how many of the kept rounds were disturbed.
    """
    bar = progress.current
    bar.begin_rounds()
    r = kept = disturbed = 0
    deadline = time.monotonic() + POLICY.retry_budget_s
    total = warmup + reps
    while kept < reps:
        order = entries[r % len(entries):] + entries[: r % len(entries)]
        load = ForeignLoad()
        times = []
        for e in order:
            bar.rounds(min(r, warmup) + kept, total, e.name)
            if e.before is not None:
                e.before(r)
            t0 = time.perf_counter()
            for _ in range(inner):
                e.step()
            times.append((e, (time.perf_counter() - t0) / inner))
        r += 1
        if r <= warmup:
            continue
        frac = load.fraction() if POLICY.max_foreign is not None else None
        if frac is not None and POLICY.max_foreign is not None and frac > POLICY.max_foreign:
            if time.monotonic() < deadline:
                POLICY.discarded += 1
                continue
            disturbed += 1
            POLICY.kept_disturbed += 1
        kept += 1
        for e, dt in times:
            e.samples.append(dt)
    bar.rounds(total, total, "")
    for e in entries:
        e.disturbed = disturbed
    return disturbed


@dataclass
class Result:
    """One table: every competitor's row in one workload at one thread count."""

    workload: str
    threads: int
    numel: int
    n_tensors: int
    rows: dict[str, dict[str, Any]]
    note: str = ""
    kind: str = "throughput"  # or "overhead" (report microseconds per step), "per-tensor"
    ref: str = "roundpipe"  # whose speed-up the ratios column gives
    foreign_load: float | None = None  # other processes' share of the CPUs while this ran
    disturbed_rounds: int = 0  # timed rounds kept although other processes were busy
    optimizer: str = "Adam"  # the update rule every competitor runs
    key: str = ""  # the --workloads name that produced it ("mix", "sgd-lora", ...)
    missing: dict[str, str] = field(default_factory=dict)  # competitor -> why it has no row ("not installed")

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def summarize(name: str, threads: int, numel: int, n_tensors: int, entries: list[Entry],
              roof: Entry | None, note: str = "", kind: str = "throughput", ref: str = "roundpipe") -> Result:
    """The rows of a table from the entries' samples: medians, GB/s, fraction of the roofline, speed-ups."""
    rows: dict[str, dict[str, Any]] = {}
    roof_gbs = None
    if roof is not None:
        t = median(roof.samples)
        roof_gbs = numel * roof.bytes_per_elem / t / 1e9
    for e in entries + ([roof] if roof is not None else []):
        t = median(e.samples)
        row: dict[str, Any] = {
            "median_s": t,
            "min_s": min(e.samples),
            "max_s": max(e.samples),
            "samples": len(e.samples),
            "bytes_per_elem": e.bytes_per_elem,
            "gelem_s": numel / t / 1e9,
            "gb_s": numel * e.bytes_per_elem / t / 1e9,
            "us_per_step": t * 1e6,
        }
        row["frac_roofline"] = row["gb_s"] / roof_gbs if roof_gbs else None
        rows[e.name] = row
    if ref in rows:
        for row in rows.values():
            row[f"{ref}_speedup"] = row["median_s"] / rows[ref]["median_s"]
    disturbed = max([e.disturbed for e in entries] + [0])
    return Result(name, threads, numel, n_tensors, rows, note, kind, ref, disturbed_rounds=disturbed)


def ratio(res: Result, a: str, b: str) -> float | None:
    """How many times faster a is than b in this result (None when either is missing)."""
    if a in res.rows and b in res.rows:
        return float(res.rows[b]["median_s"] / res.rows[a]["median_s"])
    return None

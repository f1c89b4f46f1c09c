#!/usr/bin/env python
"""Optimizer step throughput: roundpipe against torch, DeepSpeed, lion-pytorch and the memory roofline, in one run.

    python scripts/bench.py                      # every workload, torch's thread count
    python scripts/bench.py --workloads sgd,lion # one optimizer family's workloads (sgd-mix,sgd-small,sgd-lora, ...)
    python scripts/bench.py --threads 1,2        # scaling: one table per thread count
    python scripts/bench.py --json out.json      # also write the results for machines
    python scripts/bench.py --plot bench.png     # and a chart: Gelem/s against the roofline (matplotlib)
    python scripts/bench.py --quick              # small smoke run (tests/test_bench.py)
    python scripts/bench.py --sweep-serial       # where one thread beats many (SERIAL_BELOW)
    python scripts/bench.py --chunk-sweep        # CHUNK_ELEMS choices
    python scripts/bench.py --profile            # where roundpipe's step() spends its Python time
    python scripts/bench.py --new-grads          # new grad tensors every step, as zero_grad() leaves them
    python scripts/bench.py --wait-idle 240 --max-foreign 0.15   # on a shared machine (see below)

DeepSpeed's DeepSpeedCPUAdam, DeepSpeedCPUAdagrad and DeepSpeedCPULion join
when ``deepspeed`` imports and its CPU ops build (``pip install deepspeed``; the
first construction JIT-compiles them); lion-pytorch's Lion joins the Lion
workloads when ``lion_pytorch`` imports.

Workloads
---------
Adam (roundpipe.optim.Adam against torch fused, foreach and for-loop Adam and
DeepSpeed): big, mix, small, lora, tiny, in-backward, per-tensor and the
mixed-precision ones. The other optimizers each run the three throughput
layouts, named <optimizer>-<layout>:

    sgd-mix, sgd-small, sgd-lora              SGD, momentum 0.9: roundpipe.optim.SGD,
                                              torch fused, torch default (for-loop)
    adagrad-mix, adagrad-small, adagrad-lora  roundpipe.optim.Adagrad, torch fused,
                                              torch default, DeepSpeedCPUAdagrad
    lion-mix, lion-small, lion-lora           roundpipe.optim.Lion, lion-pytorch,
                                              DeepSpeedCPULion

mix is a GPT-2-like transformer (--mix), small is --small-count tensors of
--small-size elements, lora is a LoRA adapter set (--lora): per layer A (r x d)
and B (d x r) for q, k, v, o and the two MLP projections, plus biases and norms,
a few hundred small tensors. ``--workloads sgd`` (or adagrad, lion) stands for
the optimizer's three workloads.

What is measured
----------------
An fp32 Adam step reads param, grad, exp_avg and exp_avg_sq and writes param,
exp_avg and exp_avg_sq: 28 bytes per element. SGD with momentum (param, grad,
momentum buffer), Adagrad (param, grad, sum) and Lion (param, grad, exp_avg)
read three arrays and write two: 20 bytes per element. The *roofline* is a probe
from roundpipe's own compiled kernel with the optimizer's access pattern and no
arithmetic: ``rp_roofline_probe`` reads four fp32 arrays and writes three of
them in place (28 B/el), ``rp_roofline_probe3`` reads three and writes two (20
B/el), over one contiguous set of arrays as long as the workload. It is the
memory upper bound of this access pattern on this machine at this moment, and it
is timed in the same rounds as the optimizers.

GB/s are *nominal*: elements x the bytes an ideal one-pass step moves (column
B/el). torch's default and foreach steps and lion-pytorch make several passes and
move more; their GB/s is what the ideal pass would need for the same time. "x roof" is the nominal
GB/s over the roofline's GB/s.

Method: all competitors of a workload share the same parameter and gradient
tensors (each optimizer keeps its own state), so memory holds one workload at a
time. Each round times one step of every competitor, in a rotating order, so that
drift on a noisy machine hits all of them alike; the first rounds are warm-up and
the median of the rest is reported. Gradients are set once and reused, as after
``zero_grad(set_to_none=False)``; ``--new-grads`` hands every step gradient
tensors that are different objects from the previous step's (as autograd does
after ``zero_grad(set_to_none=True)``, the default), which makes roundpipe
rebuild its per-group plan each step.

Shared machines: each table says what share of the CPUs other processes used
while it ran (/proc/stat less this process's own CPU time). ``--max-foreign F``
times a round again when others used more than F of the CPUs during it (for up
to ``--retry-budget`` seconds per workload; rounds kept after that are counted
as DISTURBED), and ``--wait-idle S`` waits up to S seconds for a quiet machine
before each workload.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import functools
import gc
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import torch

import roundpipe
import roundpipe.optim
import roundpipe.optim._engine as rp_engine
from roundpipe import _build

FP32_ADAM_BYTES = 28  # read p, g, m, v; write p, m, v
FP32_THREE_ARRAY_BYTES = 20  # SGD momentum, Adagrad, Lion: read p, g, state; write p, state
LR = 1e-3
# Hyperparameters of the other optimizers, the same for every competitor of a workload.
SGD_KW: dict[str, Any] = {"lr": LR, "momentum": 0.9}
ADAGRAD_KW: dict[str, Any] = {"lr": 1e-2}
LION_KW: dict[str, Any] = {"lr": 1e-4, "betas": (0.9, 0.99)}


# ---- small helpers -------------------------------------------------------------


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def fmt_elems(n: int) -> str:
    """1048576 -> '1M', 1000 -> '1000', 110_000_000 -> '104.9M' (binary units)."""
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div:
            v = n / div
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return str(n)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


@contextlib.contextmanager
def patched(name: str, value: Any):
    """Temporarily set roundpipe.optim._engine.<name> (read at step or plan time)."""
    old = getattr(rp_engine, name)
    setattr(rp_engine, name, value)
    try:
        yield
    finally:
        setattr(rp_engine, name, old)


def free() -> None:
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
        log(f"  waiting for an idle machine: other processes use {frac:.0%} of the CPUs")


# ---- workloads -----------------------------------------------------------------

# The optimizers besides Adam, each run on the FAMILY_LAYOUTS: workload "<optimizer>-<layout>".
FAMILY = {"sgd": "SGD momentum", "adagrad": "Adagrad", "lion": "Lion"}
FAMILY_LAYOUTS = ("mix", "small", "lora")
FAMILY_WORKLOADS = [f"{o}-{lay}" for o in FAMILY for lay in FAMILY_LAYOUTS]
WORKLOADS = ",".join(["big,mix,small,lora,tiny,in-backward,per-tensor,master-weights,bf16,fp16,grad-scaler,lowmem",
                      *FAMILY_WORKLOADS])


@dataclass
class Workload:
    name: str
    shapes: list[tuple[int, ...]]
    note: str = ""

    @property
    def numel(self) -> int:
        total = 0
        for s in self.shapes:
            n = 1
            for d in s:
                n *= d
            total += n
        return total


def transformer_shapes(layers: int, d: int, vocab: int, ctx: int, mlp: int) -> list[tuple[int, ...]]:
    """A GPT-2-like parameter list: embeddings, per layer norms + q/k/v/o + MLP (weights and biases)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]  # token and position embeddings
    for _ in range(layers):
        shapes += [(d,), (d,)]  # ln_1 weight, bias
        for _ in range(4):  # q, k, v, out projections
            shapes += [(d, d), (d,)]
        shapes += [(d,), (d,)]  # ln_2
        shapes += [(mlp * d, d), (mlp * d,), (d, mlp * d), (d,)]  # fc1, fc2
    shapes += [(d,), (d,)]  # final norm
    return shapes


def lora_shapes(layers: int, d: int, r: int, mlp: int) -> list[tuple[int, ...]]:
    """A LoRA adapter set on a GPT-2-like model: what fine-tuning with adapters (and biases) trains.

    Per layer: A (r x d_in) and B (d_out x r) for the q, k, v and out projections
    and the two MLP projections, the six projection biases and the two norms'
    weight and bias. With layers=12, d=768, r=8, mlp=4: 266 tensors, 1.45M elements.
    """
    shapes: list[tuple[int, ...]] = []
    h = mlp * d
    for _ in range(layers):
        for d_in, d_out in [(d, d)] * 4 + [(d, h), (h, d)]:  # q, k, v, out; fc1, fc2
            shapes += [(r, d_in), (d_out, r)]
        shapes += [(d,)] * 4 + [(h,), (d,)]  # q, k, v, out, fc1, fc2 biases
        shapes += [(d,)] * 4  # ln_1, ln_2 weight and bias
    shapes += [(d,), (d,)]  # final norm
    return shapes


def parse_config(spec: str, defaults: dict[str, int], flag: str) -> dict[str, int]:
    cfg = dict(defaults)
    if spec:
        for kv in spec.split(","):
            k, _, v = kv.partition("=")
            if k not in cfg:
                raise SystemExit(f"{flag}: unknown key {k!r}; keys are {sorted(cfg)}")
            try:
                cfg[k] = int(v)
            except ValueError:
                raise SystemExit(f"{flag}: {k} needs an integer, got {v!r}") from None
    return cfg


def parse_mix(spec: str) -> dict[str, int]:
    return parse_config(spec, {"layers": 6, "d": 1024, "vocab": 32000, "ctx": 2048, "mlp": 4}, "--mix")


def parse_lora(spec: str) -> dict[str, int]:
    return parse_config(spec, {"layers": 12, "d": 768, "r": 8, "mlp": 4}, "--lora")


def make_params(shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32,
                grad_sets: int = 1) -> tuple[list[torch.nn.Parameter], list[list[torch.Tensor]]]:
    """Separately allocated params (as a model's are) and `grad_sets` sets of gradients.

    Grads are randn: Adam's moments settle near g and g^2, far from denormals,
    so that repeated steps on the same grads keep a steady cost.
    """
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    sets = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(grad_sets)]
    for p, g in zip(params, sets[0], strict=True):
        p.grad = g
    return params, sets


# ---- competitors ------------------------------------------------------------------


def import_class(module: str, name: str) -> tuple[Any, str]:
    """module.name, or None and why not (quietly: DeepSpeed announces itself on stdout)."""
    try:
        import importlib
        with contextlib.redirect_stdout(io.StringIO()):
            return getattr(importlib.import_module(module), name), ""
    except Exception as e:  # ImportError, or its op failing to build
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def deepspeed_adam() -> tuple[Any, str]:
    """DeepSpeedCPUAdam's class, or None and why not."""
    return import_class("deepspeed.ops.adam", "DeepSpeedCPUAdam")


def quiet_factory(cls: Any, **kw: Any) -> Callable[[list], Any]:
    """params -> cls(params, **kw), with the construction's stdout (DeepSpeed loading its op) swallowed."""
    def make(ps: list) -> Any:
        with contextlib.redirect_stdout(io.StringIO()):
            return cls(ps, **kw)
    return make


def family_competitors(optimizer: str, args: argparse.Namespace) -> dict[str, Callable[[list], Any]]:
    """name -> factory(params) -> optimizer, for the sgd/adagrad/lion workloads; same hyperparameters for all."""
    if optimizer == "sgd":
        return {
            "roundpipe": lambda ps: roundpipe.optim.SGD(ps, **SGD_KW),
            "torch-fused": lambda ps: torch.optim.SGD(ps, **SGD_KW, fused=True),
            "torch-default": lambda ps: torch.optim.SGD(ps, **SGD_KW, foreach=False),  # the for-loop step
        }
    if optimizer == "adagrad":
        comps = {
            "roundpipe": lambda ps: roundpipe.optim.Adagrad(ps, **ADAGRAD_KW),
            "torch-fused": lambda ps: torch.optim.Adagrad(ps, **ADAGRAD_KW, fused=True),
            "torch-default": lambda ps: torch.optim.Adagrad(ps, **ADAGRAD_KW, foreach=False),
        }
        if args.ds_adagrad_cls is not None:
            comps["deepspeed"] = quiet_factory(args.ds_adagrad_cls, **ADAGRAD_KW)
        return comps
    if optimizer == "lion":
        comps = {"roundpipe": lambda ps: roundpipe.optim.Lion(ps, **LION_KW)}
        if args.lion_pytorch_cls is not None:
            comps["lion-pytorch"] = quiet_factory(args.lion_pytorch_cls, **LION_KW)
        if args.ds_lion_cls is not None:
            comps["deepspeed"] = quiet_factory(args.ds_lion_cls, **LION_KW)
        return comps
    raise ValueError(f"optimizer must be one of {sorted(FAMILY)}, got {optimizer!r}")


def fp32_competitors(args: argparse.Namespace) -> dict[str, Callable[[list], Any]]:
    """name -> factory(params) -> optimizer, for the fp32 workloads."""
    comps: dict[str, Callable[[list], Any]] = {
        "roundpipe": lambda ps: roundpipe.optim.Adam(ps, lr=LR),
        "torch-fused": lambda ps: torch.optim.Adam(ps, lr=LR, fused=True),
        "torch-foreach": lambda ps: torch.optim.Adam(ps, lr=LR, foreach=True),
        "torch-default": lambda ps: torch.optim.Adam(ps, lr=LR, foreach=False),
    }
    if args.deepspeed_cls is not None:
        cls = args.deepspeed_cls

        def make_ds(ps: list) -> Any:
            with contextlib.redirect_stdout(io.StringIO()):  # it announces loading its op
                return cls(ps, lr=LR, adamw_mode=False)  # adamw_mode=False: Adam's coupled decay rule
        comps["deepspeed"] = make_ds
    return comps


class RooflineProbe:
    """The memory roofline of an optimizer's access pattern over n contiguous fp32 elements.

    bytes_per_elem 28 (Adam): rp_roofline_probe, four arrays read, three written;
    20 (SGD momentum, Adagrad, Lion): rp_roofline_probe3, three read, two written.
    """

    def __init__(self, n: int, bytes_per_elem: int = FP32_ADAM_BYTES) -> None:
        if bytes_per_elem not in (FP32_ADAM_BYTES, FP32_THREE_ARRAY_BYTES):
            raise ValueError(f"bytes_per_elem must be {FP32_ADAM_BYTES} or {FP32_THREE_ARRAY_BYTES}, "
                             f"got {bytes_per_elem}")
        k = _build.load_kernel()
        if k is None:
            raise RuntimeError("roundpipe's kernel did not build: no roofline probe")
        self.lib, ffi = k.lib, k.ffi
        self.n = n
        self.bytes_per_elem = bytes_per_elem
        count = 4 if bytes_per_elem == FP32_ADAM_BYTES else 3
        # b (the one only read) holds 1e-3, added to the others: no denormals, no overflow in any run's length
        self.arrays = [torch.zeros(n), torch.full((n,), 1e-3)] + [torch.zeros(n) for _ in range(count - 2)]
        self.ptrs = [ffi.cast("float *", t.data_ptr()) for t in self.arrays]

    def step(self) -> None:
        if self.bytes_per_elem == FP32_ADAM_BYTES:
            a, b, c, d = self.ptrs
            self.lib.rp_roofline_probe(a, b, c, d, self.n, torch.get_num_threads())
        else:
            a, b, c = self.ptrs
            self.lib.rp_roofline_probe3(a, b, c, self.n, torch.get_num_threads())

    def entry(self) -> Entry:
        return Entry("roofline-probe", self.step, self.bytes_per_elem)


@dataclass
class Entry:
    """One competitor in one workload: its step function and what it moves per element."""
    name: str
    step: Callable[[], Any]
    bytes_per_elem: float
    before: Callable[[int], Any] | None = None  # untimed setup before timed step number r
    samples: list[float] = field(default_factory=list)
    disturbed: int = 0  # kept rounds during which other processes were busy (see run_rounds)


# Rounds during which other processes took more than MAX_FOREIGN of the CPUs are
# timed again, for at most RETRY_BUDGET_S seconds per workload (--max-foreign,
# --retry-budget); None keeps every round.
MAX_FOREIGN: float | None = None
RETRY_BUDGET_S = 300.0
ROUND_STATS = {"discarded": 0, "kept_disturbed": 0}


def run_rounds(entries: list[Entry], warmup: int, reps: int, inner: int = 1) -> int:
    """Time `inner` calls of each entry's step per round, rotating the order each round.

    With MAX_FOREIGN set, a round in which other processes were busy is thrown
    away and run again until RETRY_BUDGET_S is spent; after that disturbed
    rounds are kept. Returns how many of the kept rounds were disturbed.
    """
    r = kept = disturbed = 0
    deadline = time.monotonic() + RETRY_BUDGET_S
    while kept < reps:
        order = entries[r % len(entries):] + entries[: r % len(entries)]
        load = ForeignLoad()
        times = []
        for e in order:
            if e.before is not None:
                e.before(r)
            t0 = time.perf_counter()
            for _ in range(inner):
                e.step()
            times.append((e, (time.perf_counter() - t0) / inner))
        r += 1
        if r <= warmup:
            continue
        frac = load.fraction() if MAX_FOREIGN is not None else None
        if frac is not None and frac > MAX_FOREIGN:
            if time.monotonic() < deadline:
                ROUND_STATS["discarded"] += 1
                continue
            disturbed += 1
            ROUND_STATS["kept_disturbed"] += 1
        kept += 1
        for e, dt in times:
            e.samples.append(dt)
    for e in entries:
        e.disturbed = disturbed
    return disturbed


# ---- results ---------------------------------------------------------------------------


@dataclass
class Result:
    workload: str
    threads: int
    numel: int
    n_tensors: int
    rows: dict[str, dict[str, Any]]
    note: str = ""
    kind: str = "throughput"  # or "overhead" (report microseconds per step)
    ref: str = "roundpipe"  # whose speed-up the ratios column gives
    foreign_load: float | None = None  # other processes' share of the CPUs while this ran
    disturbed_rounds: int = 0  # timed rounds kept although other processes were busy
    optimizer: str = "Adam"  # the update rule every competitor runs
    key: str = ""  # the --workloads name that produced it ("mix", "sgd-lora", ...)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def summarize(name: str, threads: int, numel: int, n_tensors: int, entries: list[Entry],
              roof: Entry | None, note: str = "", kind: str = "throughput", ref: str = "roundpipe") -> Result:
    rows: dict[str, dict[str, Any]] = {}
    roof_gbs = None
    if roof is not None:
        t = median(roof.samples)
        roof_gbs = numel * roof.bytes_per_elem / t / 1e9
    for e in entries + ([roof] if roof is not None else []):
        t = median(e.samples)
        row = {
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


def print_result(res: Result, out: Any) -> None:
    head = (f"\n## {res.workload}: {fmt_elems(res.numel)} elements ({res.numel:,}) in {res.n_tensors} tensors, "
            f"{res.threads} thread{'s' if res.threads != 1 else ''}")
    print(head, file=out)
    if res.note:
        print(f"   {res.note}", file=out)
    print(f"   speedup = the competitor's median time / {res.ref}'s", file=out)
    if res.foreign_load is not None:
        print(f"   other processes used {res.foreign_load:.0%} of the CPUs meanwhile"
              + (f"; DISTURBED: {res.disturbed_rounds} of the timed rounds ran while they were busy"
                 if res.disturbed_rounds else ""), file=out)
    w = max([28] + [len(n) for n in res.rows])
    if res.kind == "overhead":
        print(f"{'competitor':<{w}} {'us/step':>10} {'min us':>10} {'speedup':>8}", file=out)
        for n, r in res.rows.items():
            ratio = r.get(f"{res.ref}_speedup")
            print(f"{n:<{w}} {r['us_per_step']:>10.2f} {r['min_s'] * 1e6:>10.2f} "
                  f"{(f'{ratio:.2f}x' if ratio else '-'):>8}", file=out)
        return
    print(f"{'competitor':<{w}} {'ms/step':>9} {'min ms':>9} {'Gelem/s':>8} {'B/el':>5} {'GB/s':>7} {'x roof':>7} "
          f"{'speedup':>8}", file=out)
    for n, r in res.rows.items():
        ratio = r.get(f"{res.ref}_speedup")
        frac = r["frac_roofline"]
        print(f"{n:<{w}} {r['median_s'] * 1e3:>9.2f} {r['min_s'] * 1e3:>9.2f} {r['gelem_s']:>8.3f} "
              f"{r['bytes_per_elem']:>5g} {r['gb_s']:>7.2f} {(f'{frac:.3f}' if frac is not None else '-'):>7} "
              f"{(f'{ratio:.2f}x' if ratio else '-'):>8}", file=out)


# ---- the fp32 workloads --------------------------------------------------------------------


def new_grads_hook(params: list, sets: list[list[torch.Tensor]]) -> Callable[[int], None]:
    """Before step r, hand every param grad tensors that are not the ones of step r-1."""
    def before(r: int) -> None:
        gs = sets[r % len(sets)]
        for p, g in zip(params, gs, strict=True):
            p.grad = g
    return before


def bench_fp32(w: Workload, args: argparse.Namespace, threads: int, *, warmup: int, reps: int,
               inner: int = 1, kind: str = "throughput", optimizer: str = "adam") -> Result:
    """fp32 params and grads; optimizer "adam" or one of FAMILY, each against its own peers and roofline."""
    log(f"[{w.name}] {w.numel:,} elements in {len(w.shapes)} tensors, {threads} threads")
    params, sets = make_params(w.shapes, grad_sets=2 if args.new_grads else 1)
    before = new_grads_hook(params, sets) if args.new_grads else None
    if optimizer == "adam":
        comps, nbytes, title = fp32_competitors(args), FP32_ADAM_BYTES, "Adam"
    else:
        comps, nbytes, title = family_competitors(optimizer, args), FP32_THREE_ARRAY_BYTES, FAMILY[optimizer]
    entries = []
    for name, make in comps.items():
        try:
            opt = make(params)
            entries.append(Entry(name, opt.step, nbytes, before))
        except Exception as e:  # a competitor that cannot run here is reported, not fatal
            log(f"  {name}: skipped ({type(e).__name__}: {e})")
    roof = RooflineProbe(w.numel, nbytes).entry()
    run_rounds(entries + [roof], warmup, reps, inner)
    note = w.note + (" [--new-grads: fresh grad tensors every step]" if args.new_grads else "")
    res = summarize(w.name, threads, w.numel, len(w.shapes), entries, roof, note, kind)
    res.optimizer = title
    del entries, roof, params, sets
    free()
    return res


# ---- mixed precision (issue 5) ------------------------------------------------------------


def rp_mixed_support() -> tuple[bool, bool, str]:
    """(master_weights works, bf16 moments work, why not) — probed on a 64-element bf16 param."""
    p = torch.nn.Parameter(torch.randn(64).bfloat16())
    p.grad = torch.randn(64).bfloat16()
    try:
        roundpipe.optim.Adam([p], lr=LR, master_weights=True).step()
    except Exception as e:
        return False, False, f"master_weights=True unavailable ({type(e).__name__}: {e})"
    try:
        roundpipe.optim.Adam([p], lr=LR, master_weights=True, exp_avg_dtype=torch.bfloat16,
                             exp_avg_sq_dtype=torch.bfloat16).step()
    except Exception as e:
        return True, False, f"bf16 moments unavailable ({type(e).__name__}: {e})"
    return True, True, ""


def rp_bf16_support(dtype: torch.dtype = torch.bfloat16) -> str:
    p = torch.nn.Parameter(torch.randn(64).to(dtype))
    p.grad = torch.randn(64).to(dtype)
    try:
        roundpipe.optim.Adam([p], lr=LR).step()
        return ""
    except Exception as e:
        return f"{dtype} params unavailable ({type(e).__name__}: {e})"


class TorchMasterSeq:
    """What a torch mixed-precision loop does: fp32 grad copy, fused Adam on fp32 masters, copy back.

    prealloc=True copies into fp32 grad buffers kept between steps with one
    _foreach_copy_ (the fastest torch spelling); prealloc=False is the common
    ``master.grad = p.grad.float()`` ... ``p.copy_(master)`` per tensor.
    """

    def __init__(self, params: list, prealloc: bool) -> None:
        self.params = params
        self.masters = [p.detach().float().requires_grad_() for p in params]
        self.prealloc = prealloc
        if prealloc:
            self.g32 = [torch.empty_like(m) for m in self.masters]
            for m, g in zip(self.masters, self.g32, strict=True):
                m.grad = g
        self.opt = torch.optim.Adam(self.masters, lr=LR, fused=True)

    def step(self) -> None:
        with torch.no_grad():
            if self.prealloc:
                torch._foreach_copy_(self.g32, [p.grad for p in self.params])
                self.opt.step()
                torch._foreach_copy_([p.data for p in self.params], self.masters)
            else:
                for m, p in zip(self.masters, self.params, strict=True):
                    m.grad = p.grad.float()
                self.opt.step()
                for m, p in zip(self.masters, self.params, strict=True):
                    p.copy_(m)


def bench_master_weights(w: Workload, args: argparse.Namespace, threads: int) -> Result | None:
    ok, ok_bf16_moments, why = rp_mixed_support()
    if not ok:
        log(f"[{w.name}] skipped: {why}")
        return Result(w.name, threads, w.numel, len(w.shapes), {}, f"skipped: {why}")
    log(f"[{w.name}] {w.numel:,} elements in {len(w.shapes)} tensors, {threads} threads")
    params, _ = make_params(w.shapes, torch.bfloat16)
    entries = []
    # bytes per element: bf16 grad read 2, fp32 master/m/v read 12 + write 12, bf16 param write 2
    rp = roundpipe.optim.Adam(params, lr=LR, master_weights=True)
    entries.append(Entry("roundpipe master_weights", rp.step, 28))
    if ok_bf16_moments:
        rp16 = roundpipe.optim.Adam(params, lr=LR, master_weights=True, exp_avg_dtype=torch.bfloat16,
                                    exp_avg_sq_dtype=torch.bfloat16)
        # bf16 moments: m and v are 2+2 bytes each instead of 4+4
        entries.append(Entry("roundpipe mw + bf16 moments", rp16.step, 20))
    # grad.float(): read 2, write 4; fused step on fp32: 28; param.copy_(master): read 4, write 2
    entries.append(Entry("torch seq (foreach_copy)", TorchMasterSeq(params, True).step, 40))
    entries.append(Entry("torch seq (grad.float())", TorchMasterSeq(params, False).step, 40))
    roof = Entry("roofline-probe", RooflineProbe(w.numel).step, FP32_ADAM_BYTES)
    run_rounds(entries + [roof], args.warmup, args.reps)
    note = (w.note + " bf16 params and grads; fp32 masters and moments. B/el counts one pass "
            "(roundpipe) or the three passes of the torch sequence. " + (why if why else ""))
    res = summarize(w.name, threads, w.numel, len(w.shapes), entries, roof, note.strip(),
                    ref="roundpipe master_weights")
    del entries, roof, params, rp
    free()
    return res


def bench_low_precision_params(w: Workload, args: argparse.Namespace, threads: int,
                               dtype: torch.dtype = torch.bfloat16) -> Result | None:
    """bf16 or fp16 params, grads and moments (torch's layout), against torch's fused step on them."""
    why = rp_bf16_support(dtype)
    if why:
        log(f"[{w.name}] skipped: {why}")
        return Result(w.name, threads, w.numel, len(w.shapes), {}, f"skipped: {why}")
    log(f"[{w.name}] {w.numel:,} elements in {len(w.shapes)} tensors, {threads} threads")
    params, _ = make_params(w.shapes, dtype)
    entries = [
        Entry("roundpipe", roundpipe.optim.Adam(params, lr=LR).step, 14),
        Entry("torch-fused", torch.optim.Adam(params, lr=LR, fused=True).step, 14),
        Entry("torch-foreach", torch.optim.Adam(params, lr=LR, foreach=True).step, 14),
    ]
    roof = Entry("roofline-probe", RooflineProbe(w.numel).step, FP32_ADAM_BYTES)
    run_rounds(entries + [roof], args.warmup, args.reps)
    res = summarize(w.name, threads, w.numel, len(w.shapes), entries, roof,
                    (w.note + f" {str(dtype)[6:]} params, grads and moments: 14 B/el; x roof compares with the fp32 "
                     "28 B/el probe's bandwidth.").strip())
    del entries, roof, params
    free()
    return res


def bench_low_memory(w: Workload, args: argparse.Namespace, threads: int) -> Result:
    """Issue 12's layouts against the ones they slim: fp32 params with bf16 moments against fp32
    moments (28 -> 20 B/el), and bf16 params with stochastic rounding against round-to-nearest."""
    log(f"[{w.name}] {w.numel:,} elements in {len(w.shapes)} tensors, {threads} threads")
    p32, _ = make_params(w.shapes, torch.float32)
    p32b, _ = make_params(w.shapes, torch.float32)
    p16, _ = make_params(w.shapes, torch.bfloat16)
    p16b, _ = make_params(w.shapes, torch.bfloat16)
    bf16 = torch.bfloat16
    entries = [
        Entry("fp32 moments", roundpipe.optim.AdamW(p32, lr=LR).step, FP32_ADAM_BYTES),
        Entry("bf16 moments", roundpipe.optim.AdamW(p32b, lr=LR, exp_avg_dtype=bf16, exp_avg_sq_dtype=bf16).step, 20),
        Entry("bf16 params", roundpipe.optim.AdamW(p16, lr=LR).step, 14),
        Entry("bf16 params, stochastic rounding", roundpipe.optim.AdamW(p16b, lr=LR, bf16_stochastic_round=True).step, 14),
    ]
    roof = Entry("roofline-probe", RooflineProbe(w.numel).step, FP32_ADAM_BYTES)
    run_rounds(entries + [roof], args.warmup, args.reps)
    res = summarize(w.name, threads, w.numel, len(w.shapes), entries, roof,
                    (w.note + " AdamW. speedup: fp32 moments' time / each row's.").strip(), ref="fp32 moments")
    del entries, roof, p32, p32b, p16, p16b
    free()
    return res


def bench_grad_scaler(w: Workload, args: argparse.Namespace, threads: int) -> Result:
    """GradScaler's unscale + Adam: direct fused calls, and the whole scaler.step()/update() path."""
    log(f"[{w.name}] {w.numel:,} elements in {len(w.shapes)} tensors, {threads} threads")
    params, _ = make_params(w.shapes)
    # Scale 1.0: unscaling in place then leaves the reused grads as they are, so
    # that every step does the same work (a real scale would shrink them towards
    # denormals). The kernels divide by it all the same.
    scale = torch.ones(())
    found_inf = torch.zeros(())
    rp = roundpipe.optim.Adam(params, lr=LR)
    tf = torch.optim.Adam(params, lr=LR, fused=True)
    entries = [
        # unscale in the step: read g and write it back unscaled (+4), as torch's fused kernel does
        Entry("roundpipe step(grad_scale,found_inf)", functools.partial(rp.step, grad_scale=scale, found_inf=found_inf),
              32),  # partial, not a lambda: rp is deleted below
        Entry("torch-fused step(grad_scale,found_inf)", tf.step, 32),
    ]
    tf.grad_scale, tf.found_inf = scale, found_inf  # torch's fused Adam reads them as attributes

    def scaler_loop(opt: Any) -> Callable[[], None]:
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1 << 30)
        scaler.scale(torch.ones(()))  # creates the scale tensor, as scaling the loss would

        def step() -> None:
            scaler.step(opt)
            scaler.update()
        return step

    # scaler.step: an inf check that reads and rewrites every grad (8), then the step
    rp2 = roundpipe.optim.Adam(params, lr=LR)
    tf2 = torch.optim.Adam(params, lr=LR, fused=True)
    tfe = torch.optim.Adam(params, lr=LR, foreach=True)
    tfd = torch.optim.Adam(params, lr=LR)  # what a CPU user gets without flags: the for-loop step
    entries += [
        Entry("roundpipe via GradScaler", scaler_loop(rp2), 40),
        Entry("torch-fused via GradScaler", scaler_loop(tf2), 40),
        Entry("torch-foreach via GradScaler", scaler_loop(tfe), 36),
        Entry("torch-default via GradScaler", scaler_loop(tfd), 36),
    ]
    roof = Entry("roofline-probe", RooflineProbe(w.numel).step, FP32_ADAM_BYTES)
    run_rounds(entries + [roof], args.warmup, args.reps)
    note = (w.note + " fp32. Direct rows pass grad_scale/found_inf to step(); 'via GradScaler' rows run "
            "torch.amp.GradScaler('cpu').step()+update(), whose inf check (unscale_ by 1.0) reads and "
            "rewrites every grad before the fused step unscales it again. Scale 1.0 keeps reused grads "
            "constant.").strip()
    res = summarize(w.name, threads, w.numel, len(w.shapes), entries, roof, note,
                    ref="roundpipe step(grad_scale,found_inf)")
    del entries, roof, params, rp, tf, rp2, tf2, tfe, tfd
    free()
    return res


# ---- per-call overhead: tiny tensor, optimizer in backward, per-tensor cost --------------------


def bench_in_backward(args: argparse.Namespace, threads: int) -> list[Result]:
    """One optimizer per parameter, stepped from a post-accumulate-grad hook (PyTorch's tutorial)."""
    out = []
    n = args.tiny
    # 1. The hook's body on one small tensor: step() then zero_grad(), with a fresh
    #    grad tensor each call as autograd gives after zero_grad(set_to_none=True).
    log(f"[in-backward call] {n} elements, {threads} threads")
    p = torch.nn.Parameter(torch.randn(n))
    pool = [torch.randn(n) for _ in range(2)]
    entries = []
    makers = {
        "roundpipe": lambda ps: roundpipe.optim.Adam(ps, lr=LR),
        "torch-fused": lambda ps: torch.optim.Adam(ps, lr=LR, fused=True),
        "torch-foreach": lambda ps: torch.optim.Adam(ps, lr=LR, foreach=True),
        "torch-default": lambda ps: torch.optim.Adam(ps, lr=LR, foreach=False),
    }
    calls = [0]
    for name, make in makers.items():
        opt = make([p])

        def hook_body(opt: Any = opt) -> None:
            calls[0] += 1
            p.grad = pool[calls[0] & 1]  # a new grad object each call, as from autograd (same cost for all)
            opt.step()
            opt.zero_grad(set_to_none=True)
        entries.append(Entry(name, hook_body, FP32_ADAM_BYTES))
    run_rounds(entries, args.warmup, args.overhead_rounds, args.overhead_inner)
    out.append(summarize(f"in-backward: one call, {n} elements", threads, n, 1, entries, None,
                         "hook body per call: p.grad = new tensor; opt.step(); opt.zero_grad()", kind="overhead"))

    # 2. A real backward through a small MLP with a hook per parameter.
    width, depth, batch = args.ib_width, args.ib_depth, 8
    log(f"[in-backward model] MLP {depth} x Linear({width},{width}), batch {batch}, {threads} threads")
    torch.manual_seed(0)
    x = torch.randn(batch, width)
    entries = []

    def model_entry(name: str, make: Callable[[list], Any] | None) -> Entry:
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])
        if make is not None:
            opts = {q: make([q]) for q in model.parameters()}

            def hook(q: torch.Tensor) -> None:
                opts[q].step()
                opts[q].zero_grad(set_to_none=True)
            for q in model.parameters():
                q.register_post_accumulate_grad_hook(hook)

        def it() -> None:
            model(x).square().mean().backward()
            if make is None:
                model.zero_grad(set_to_none=True)
        return Entry(name, it, FP32_ADAM_BYTES)

    entries.append(model_entry("no optimizer (fwd+bwd only)", None))
    for name in ("roundpipe", "torch-fused", "torch-foreach"):
        entries.append(model_entry(name, makers[name]))
    run_rounds(entries, args.warmup, args.overhead_rounds, max(1, args.overhead_inner // 10))
    nparams = 2 * depth
    res = summarize(f"in-backward: MLP {depth}x{width}, {nparams} params", threads,
                    sum(q.numel() for q in torch.nn.Linear(width, width).parameters()) * depth, nparams,
                    entries, None, "", kind="overhead")
    base = res.rows["no optimizer (fwd+bwd only)"]["median_s"]
    for row in res.rows.values():
        row["optimizer_us_per_param"] = (row["median_s"] - base) / nparams * 1e6
    res.note = ("us per training iteration (forward+backward with one optimizer per param stepped in its "
                "post-accumulate-grad hook). Optimizer cost per param: " + ", ".join(
                    f"{n} {r['optimizer_us_per_param']:.1f} us" for n, r in res.rows.items() if n != "no optimizer (fwd+bwd only)"))
    out.append(res)
    free()
    return out


def bench_per_tensor(args: argparse.Namespace, threads: int) -> list[Result]:
    """Step time against the number of (16-element) tensors: the per-tensor cost, reused and fresh grads."""
    out = []
    counts = [1, 16, 256, 4096] if not args.quick else [1, 64]
    for fresh in (False, True):
        series: dict[str, list[tuple[int, float]]] = {}
        for count in counts:
            params, sets = make_params([(16,)] * count, grad_sets=2 if fresh else 1)
            before = new_grads_hook(params, sets) if fresh else None
            entries = [
                Entry("roundpipe", roundpipe.optim.Adam(params, lr=LR).step, FP32_ADAM_BYTES, before),
                Entry("torch-fused", torch.optim.Adam(params, lr=LR, fused=True).step, FP32_ADAM_BYTES, before),
                Entry("torch-foreach", torch.optim.Adam(params, lr=LR, foreach=True).step, FP32_ADAM_BYTES, before),
            ]
            inner = 1 if fresh else max(1, args.overhead_inner // max(1, count // 16))
            run_rounds(entries, args.warmup, args.overhead_rounds, inner)
            for e in entries:
                series.setdefault(e.name, []).append((count, median(e.samples)))
            del entries, params, sets
        rows = {}
        for name, pts in series.items():
            (c0, t0), (c1, t1) = pts[0], pts[-1]
            rows[name] = {
                "points_us": {str(c): t * 1e6 for c, t in pts},
                "fixed_us": t0 * 1e6,
                "per_tensor_us": (t1 - t0) / (c1 - c0) * 1e6,
            }
        out.append(Result(f"per-tensor cost ({'fresh' if fresh else 'reused'} grads)", threads,
                          16 * counts[-1], counts[-1], rows,
                          "step() time for N tensors of 16 elements; per_tensor_us = slope between the "
                          f"smallest and largest N{'; fresh grad objects every step' if fresh else ''}",
                          kind="per-tensor"))
        free()
    return out


def print_per_tensor(res: Result, out: Any) -> None:
    print(f"\n## {res.workload}, {res.threads} threads\n   {res.note}", file=out)
    if res.foreign_load is not None:
        print(f"   other processes used {res.foreign_load:.0%} of the CPUs meanwhile", file=out)
    counts = list(next(iter(res.rows.values()))["points_us"])
    print(f"{'competitor':<16}" + "".join(f"{'N=' + c:>11}" for c in counts) + f"{'us/tensor':>11}", file=out)
    for name, r in res.rows.items():
        print(f"{name:<16}" + "".join(f"{r['points_us'][c]:>11.1f}" for c in counts)
              + f"{r['per_tensor_us']:>11.3f}", file=out)


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
    sizes = [1 << k for k in range(10, 21)] if not args.quick else [1 << 10, 1 << 14, 1 << 17]
    layouts = {"one tensor": lambda n: [(n,)], "1K-element tensors": lambda n: [(1024,)] * (n // 1024)}
    flush = np.zeros(16 << 20, dtype=np.float32)
    out: dict[str, Any] = {"threads": threads, "chunk_elems": rp_engine.CHUNK_ELEMS,
                           "serial_below_now": rp_engine.SERIAL_BELOW, "rows": []}
    log(f"[sweep-serial] sizes {sizes[0]}..{sizes[-1]}, 1 vs {threads} threads")
    reps = args.sweep_reps
    deadline = time.monotonic() + RETRY_BUDGET_S
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
                    frac = load.fraction() if MAX_FOREIGN is not None else None
                    if frac is None or frac <= MAX_FOREIGN:
                        break
                    if time.monotonic() > deadline:
                        row[f"{mode}_disturbed"] = True
                        break
                    ROUND_STATS["discarded"] += 1
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


def print_sweep_serial(sw: dict[str, Any], out: Any) -> None:
    print(f"\n## serial-threshold sweep: 1 thread vs {sw['threads']} (CHUNK_ELEMS={sw['chunk_elems']}, "
          f"SERIAL_BELOW now {sw['serial_below_now']})", file=out)
    print("   warm: back-to-back steps; cold: caches flushed and OpenMP threads asleep before each step", file=out)
    print(f"{'layout':<20} {'elements':>9} {'chunks':>6} {'warm 1T us':>11} {'warm NT us':>11} {'NT speedup':>11} "
          f"{'cold 1T us':>11} {'cold NT us':>11} {'NT speedup':>11}", file=out)
    for r in sw["rows"]:
        print(f"{r['layout']:<20} {fmt_elems(r['numel']):>9} {r['chunks']:>6} {r['warm_serial_us']:>11.1f} {r['warm_parallel_us']:>11.1f} "
              f"{r['warm_parallel_speedup']:>10.2f}x {r['cold_serial_us']:>11.1f} {r['cold_parallel_us']:>11.1f} "
              f"{r['cold_parallel_speedup']:>10.2f}x"
              + ("  DISTURBED" if r.get("warm_disturbed") or r.get("cold_disturbed") else ""), file=out)
    if sw.get("foreign_load") is not None:
        print(f"   other processes used {sw['foreign_load']:.0%} of the CPUs meanwhile", file=out)
    for k, v in sw["crossover"].items():
        print(f"   crossover ({k}): " + (f"{v:,} elements ({fmt_elems(v)})" if v else "parallel never wins by 5% for good"),
              file=out)


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
            entries.append(Entry(f"CHUNK_ELEMS={c}", opt.step, FP32_ADAM_BYTES))
        roof = Entry("roofline-probe", RooflineProbe(w.numel).step, FP32_ADAM_BYTES)
        run_rounds(entries + [roof], args.warmup, args.reps)
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
    cases = [("tiny", [(args.tiny,)], 20000 if not args.quick else 500)]
    n_small = args.small_count if not args.quick else 256
    cases.append(("many-small", [(args.small_size,)] * n_small, 100 if not args.quick else 5))
    if not args.quick:
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
                opt._kernel = timed
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


# ---- targets (issue 4 section 3, issue 5 section 5, issue 11 section 7) and scaling summary -------


def _ratio(res: Result, a: str, b: str) -> float | None:
    """How many times faster a is than b in this result (None when either is missing)."""
    if a in res.rows and b in res.rows:
        return res.rows[b]["median_s"] / res.rows[a]["median_s"]
    return None


def check_targets(results: list[Result]) -> list[dict[str, Any]]:
    """Each target of the issues against this run: measured value, goal, met or not."""
    checks: list[dict[str, Any]] = []

    def add(threads: int, workload: str, what: str, value: float | None, goal: float, higher_better: bool = True) -> None:
        if value is None:
            return
        ok = value >= goal if higher_better else value <= goal
        checks.append({"threads": threads, "workload": workload, "what": what, "value": value,
                       "goal": goal, "higher_is_better": higher_better, "met": ok})

    for res in results:
        if not res.rows:
            continue
        rp = res.rows.get("roundpipe")
        th = res.threads
        if res.workload == "big tensor" and rp:
            add(th, res.workload, "roundpipe / roofline", rp["frac_roofline"], 0.95)
        elif res.workload == "transformer mix" and rp:
            add(th, res.workload, "roundpipe / roofline", rp["frac_roofline"], 0.90)
            add(th, res.workload, "speedup vs torch-fused", _ratio(res, "roundpipe", "torch-fused"), 1.1)
            add(th, res.workload, "speedup vs torch-default", _ratio(res, "roundpipe", "torch-default"), 5.0)
        elif res.workload.startswith("many small") and rp:
            add(th, res.workload, "roundpipe / roofline", rp["frac_roofline"], 0.85)
            add(th, res.workload, "speedup vs torch-fused", _ratio(res, "roundpipe", "torch-fused"), 1.5)
            add(th, res.workload, "speedup vs torch-default", _ratio(res, "roundpipe", "torch-default"), 3.0)
        elif res.key == "lora" and rp:
            add(th, res.workload, "speedup vs torch-fused", _ratio(res, "roundpipe", "torch-fused"), 1.5)
            add(th, res.workload, "speedup vs torch-default", _ratio(res, "roundpipe", "torch-default"), 3.0)
        elif res.key.partition("-")[0] in FAMILY and rp:
            # issue 11 section 7: the same goals for every optimizer, against the peers it has
            layout = res.key.partition("-")[2]
            if layout == "mix":
                add(th, res.workload, "roundpipe / roofline", rp["frac_roofline"], 0.90)
                add(th, res.workload, "speedup vs torch-fused", _ratio(res, "roundpipe", "torch-fused"), 1.0)
            else:
                add(th, res.workload, "speedup vs torch-fused", _ratio(res, "roundpipe", "torch-fused"), 1.5)
            add(th, res.workload, "speedup vs torch-default", _ratio(res, "roundpipe", "torch-default"), 3.0)
            add(th, res.workload, "speedup vs lion-pytorch", _ratio(res, "roundpipe", "lion-pytorch"), 5.0)
        elif res.workload.startswith("tiny") and rp and "torch-fused" in res.rows:
            add(th, res.workload, "roundpipe us/step / torch-fused us/step",
                rp["median_s"] / res.rows["torch-fused"]["median_s"], 1.0, higher_better=False)
        elif "master_weights" in res.workload:
            add(th, res.workload, "speedup vs torch seq (foreach_copy)",
                _ratio(res, "roundpipe master_weights", "torch seq (foreach_copy)"), 1.5)
            add(th, res.workload, "speedup vs torch seq (grad.float())",
                _ratio(res, "roundpipe master_weights", "torch seq (grad.float())"), 1.5)
        elif res.workload == "low-memory layouts" and "fp32 moments" in res.rows:
            # issue 12 section 1 and 3: bf16 moments <= 0.8x the fp32-moment step; stochastic rounding
            # within 10% of the round-to-nearest bf16 step
            for what, a, b, goal in (("bf16 moments time / fp32 moments time", "bf16 moments", "fp32 moments", 0.8),
                                     ("stochastic rounding time / bf16 params time",
                                      "bf16 params, stochastic rounding", "bf16 params", 1.1)):
                speedup = _ratio(res, a, b)
                add(th, res.workload, what, 1.0 / speedup if speedup else None, goal, higher_better=False)
        elif res.workload.startswith("GradScaler"):
            add(th, res.workload, "via GradScaler: speedup vs torch-fused",
                _ratio(res, "roundpipe via GradScaler", "torch-fused via GradScaler"), 1.3)
            add(th, res.workload, "via GradScaler: speedup vs torch-foreach",
                _ratio(res, "roundpipe via GradScaler", "torch-foreach via GradScaler"), 1.3)
            add(th, res.workload, "via GradScaler: speedup vs torch-default",
                _ratio(res, "roundpipe via GradScaler", "torch-default via GradScaler"), 1.3)
            add(th, res.workload, "direct step(): speedup vs torch-fused",
                _ratio(res, "roundpipe step(grad_scale,found_inf)", "torch-fused step(grad_scale,found_inf)"), 1.3)
    return checks


def print_targets(checks: list[dict[str, Any]], out: Any) -> None:
    if not checks:
        return
    print("\n## targets (issue 4 section 3; issue 5 section 5; issue 11 section 7), set for 2 threads", file=out)
    print(f"{'threads':>7}  {'workload':<48} {'measure':<42} {'value':>9} {'goal':>8}  result", file=out)
    for c in checks:
        goal = (">= " if c["higher_is_better"] else "<= ") + f"{c['goal']:g}"
        print(f"{c['threads']:>7}  {c['workload'][:48]:<48} {c['what']:<42} {c['value']:>9.3f} {goal:>8}  "
              f"{'PASS' if c['met'] else 'SHORT'}", file=out)


def print_scaling(results: list[Result], out: Any) -> None:
    """Gelem/s per thread count, for every throughput workload run at more than one count."""
    by: dict[str, dict[int, Result]] = {}
    for r in results:
        if r.kind == "throughput" and r.rows:
            by.setdefault(r.workload, {})[r.threads] = r
    by = {k: v for k, v in by.items() if len(v) > 1}
    if not by:
        return
    print("\n## scaling: Gelem/s by thread count", file=out)
    for workload, per in by.items():
        counts = sorted(per)
        print(f"\n{workload}", file=out)
        print(f"{'competitor':<40}" + "".join(f"{str(c) + ' thr':>10}" for c in counts), file=out)
        for name in per[counts[0]].rows:
            print(f"{name:<40}" + "".join(
                f"{per[c].rows[name]['gelem_s']:>10.3f}" if name in per[c].rows else f"{'-':>10}" for c in counts),
                file=out)


# Workloads --plot can draw: throughput tables, which carry a roofline-probe row
# (tiny and in-backward are per-call costs in microseconds; per-tensor has no Gelem/s).
PLOT_WORKLOADS = {"big", "mix", "small", "lora", "master-weights", "bf16", "fp16", "grad-scaler", "lowmem",
                  *FAMILY_WORKLOADS}


def plot_results(results: list[Result], meta: dict[str, Any], path: str) -> int:
    """Grouped bars of every competitor's Gelem/s per workload, each against the roofline; returns bars drawn.

    The roofline of a bar is the probe's measured GB/s over that bar's bytes per element: the step's
    memory bound on this machine. In an fp32 workload every competitor moves the same bytes (28 B/el for
    Adam, 20 for SGD momentum, Adagrad and Lion, each against its own probe), so the bars of a workload
    share one roofline line; a mixed-precision competitor moving fewer bytes has a higher one.
    """
    import textwrap

    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    groups = [r for r in results if r.kind == "throughput" and "roofline-probe" in r.rows]
    if not groups:
        return 0
    thread_counts = sorted({r.threads for r in groups})
    names: list[str] = []  # every competitor, in order of first appearance: one colour each
    for r in groups:
        names += [n for n in r.rows if n != "roofline-probe" and n not in names]
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colour = {n: cmap(i % cmap.N) for i, n in enumerate(names)}

    widest = max(len(r.rows) - 1 for r in groups)
    fig, axes = plt.subplots(len(thread_counts), 1, squeeze=False, sharey=True,
                             figsize=(max(8.0, 0.32 * widest * len(groups) / len(thread_counts) + 3),
                                      4.2 * len(thread_counts) + 1.4))
    drawn = 0
    for ax, th in zip(axes[:, 0], thread_counts, strict=True):
        mine = [r for r in groups if r.threads == th]
        labels = []
        for gi, r in enumerate(mine):
            comps = [n for n in r.rows if n != "roofline-probe"]
            width = 0.8 / len(comps)
            roof_gbs = r.rows["roofline-probe"]["gb_s"]
            for ci, n in enumerate(comps):
                row = r.rows[n]
                x = gi - 0.4 + width * (ci + 0.5)
                ax.bar(x, row["gelem_s"], width * 0.92, color=colour[n], label=n)
                # this bar's memory bound, as a black tick over it
                ax.hlines(roof_gbs / row["bytes_per_elem"], x - width / 2, x + width / 2, colors="black",
                          linewidth=2, label="roofline (probe GB/s / the bar's B/el)")
                drawn += 1
            title = r.workload if r.workload.startswith(r.optimizer) else f"{r.optimizer}: {r.workload}"
            labels.append("\n".join(textwrap.wrap(title, 22)) + f"\n{fmt_elems(r.numel)} el")
        ax.set_xticks(range(len(mine)), labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("Gelem/s (log)")
        ax.set_title(f"{th} thread{'s' if th != 1 else ''}", fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in axes[:, 0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(4, len(handles)), fontsize=8,
               frameon=False)
    fig.suptitle(f"Optimizer step throughput against the memory roofline: {meta['cpu']}, torch {meta['torch']}, "
                 f"roundpipe {meta['git']}, {meta['date'][:10]}", fontsize=10)
    rows_of_legend = -(-len(handles) // min(4, len(handles)))
    fig.tight_layout(rect=(0, 0.04 * rows_of_legend + 0.02, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


# ---- driver ------------------------------------------------------------------------------------


def git_state() -> str:
    """The commit of the roundpipe being measured, and whether its sources differ from it."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(roundpipe.__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "roundpipe"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "not a git checkout"
    return head + (" + uncommitted changes in roundpipe/" if dirty else "")


def int_list(text: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int_list, default=[], help="comma-separated thread counts (default: torch's)")
    ap.add_argument("--json", default="", help="write results as JSON to this path ('-' for stdout)")
    ap.add_argument("--quick", action="store_true", help="small sizes, few reps: a smoke run")
    ap.add_argument("--workloads", default=WORKLOADS,
                    help="which workloads to run (comma-separated; sgd, adagrad or lion stand for "
                         "that optimizer's -mix, -small and -lora workloads)")
    ap.add_argument("--big", type=int, default=64 << 20, help="elements of the one big tensor")
    ap.add_argument("--mix", default="", help="transformer mix config, e.g. layers=6,d=1024,vocab=32000,ctx=2048,mlp=4")
    ap.add_argument("--lora", default="", help="LoRA mix config, e.g. layers=12,d=768,r=8,mlp=4")
    ap.add_argument("--small-count", type=int, default=4096)
    ap.add_argument("--small-size", type=int, default=8192)
    ap.add_argument("--tiny", type=int, default=1000)
    ap.add_argument("--mixed-scale", default="", help="mix config for the mixed-precision workloads (default: --mix)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--overhead-rounds", type=int, default=31, help="timed rounds for per-call workloads")
    ap.add_argument("--overhead-inner", type=int, default=200, help="calls per round for per-call workloads")
    ap.add_argument("--ib-width", type=int, default=256)
    ap.add_argument("--ib-depth", type=int, default=8)
    ap.add_argument("--new-grads", action="store_true",
                    help="fresh grad tensor objects every step (as after zero_grad(set_to_none=True))")
    ap.add_argument("--no-deepspeed", action="store_true", help="leave DeepSpeed's CPU optimizers out")
    ap.add_argument("--no-lion-pytorch", action="store_true", help="leave lion-pytorch's Lion out")
    ap.add_argument("--max-foreign", type=float, default=None,
                    help="time a round again when other processes used more than this share of the CPUs during it")
    ap.add_argument("--retry-budget", type=float, default=300.0,
                    help="seconds per workload for timing disturbed rounds again (with --max-foreign)")
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="before each workload, wait up to this many seconds for other processes to go quiet")
    ap.add_argument("--sweep-serial", action="store_true", help="measure the single-thread threshold")
    ap.add_argument("--sweep-reps", type=int, default=15)
    ap.add_argument("--chunk-sweep", action="store_true", help="measure CHUNK_ELEMS choices")
    ap.add_argument("--chunks", type=int_list, default=[2048, 4096, 8192, 16384, 32768, 65536, 262144])
    ap.add_argument("--profile", action="store_true", help="profile roundpipe's step() Python path")
    ap.add_argument("--profile-out", default="", help="also write the profile text to this path")
    ap.add_argument("--plot", default="", metavar="FILE.png",
                    help="draw each throughput workload's Gelem/s against the roofline (needs matplotlib: "
                         "pip install 'roundpipe[bench]')")
    args = ap.parse_args(argv)

    if args.quick:
        args.big = 1 << 18
        args.mix = args.mix or "layers=1,d=128,vocab=1000,ctx=64,mlp=4"
        args.lora = args.lora or "layers=2,d=64,r=4,mlp=4"
        args.small_count, args.small_size = 32, 1024
        args.warmup, args.reps = 1, 3
        args.overhead_rounds, args.overhead_inner = 3, 20
        args.ib_width, args.ib_depth = 32, 2
        args.sweep_reps = 3
        args.chunks = [4096, 16384]
    global MAX_FOREIGN, RETRY_BUDGET_S
    MAX_FOREIGN, RETRY_BUDGET_S = args.max_foreign, args.retry_budget
    mix_cfg = parse_mix(args.mix)
    lora_cfg = parse_lora(args.lora)
    mixed_cfg = parse_mix(args.mixed_scale) if args.mixed_scale else mix_cfg
    thread_list = args.threads or [torch.get_num_threads()]
    wanted = set(args.workloads.split(",")) if args.workloads else set()
    for opt in FAMILY:  # "sgd" = sgd-mix, sgd-small, sgd-lora
        if opt in wanted:
            wanted = (wanted - {opt}) | {f"{opt}-{lay}" for lay in FAMILY_LAYOUTS}
    known = set(WORKLOADS.split(","))
    if wanted - known:
        ap.error(f"--workloads: unknown {sorted(wanted - known)}; choose from {sorted(known | set(FAMILY))}")

    if args.plot:  # fail before measuring for minutes, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            ap.error("--plot needs matplotlib, which is not installed: pip install matplotlib "
                     "(or the bench extra: pip install 'roundpipe[bench]')")
        if not wanted & PLOT_WORKLOADS:
            ap.error(f"--plot draws the throughput workloads ({','.join(sorted(PLOT_WORKLOADS))}); "
                     f"--workloads chose none of them")

    args.deepspeed_cls, ds_why = (None, "--no-deepspeed") if args.no_deepspeed else deepspeed_adam()
    if ds_why:
        log(f"deepspeed: skipped ({ds_why})")
    args.ds_adagrad_cls = args.ds_lion_cls = None
    peers: dict[str, str] = {}  # the optional peers of the other optimizers: "available" or why not
    if wanted & {f"adagrad-{lay}" for lay in FAMILY_LAYOUTS}:
        args.ds_adagrad_cls, why = ((None, "--no-deepspeed") if args.no_deepspeed
                                    else import_class("deepspeed.ops.adagrad", "DeepSpeedCPUAdagrad"))
        peers["DeepSpeedCPUAdagrad"] = why or "available"
    if wanted & {f"lion-{lay}" for lay in FAMILY_LAYOUTS}:
        args.ds_lion_cls, why = ((None, "--no-deepspeed") if args.no_deepspeed
                                 else import_class("deepspeed.ops.lion", "DeepSpeedCPULion"))
        peers["DeepSpeedCPULion"] = why or "available"
        args.lion_pytorch_cls, why = ((None, "--no-lion-pytorch") if args.no_lion_pytorch
                                      else import_class("lion_pytorch", "Lion"))
        peers["lion-pytorch"] = why or "available"
    else:
        args.lion_pytorch_cls = None
    for name, why in peers.items():
        if why != "available":
            log(f"{name}: skipped ({why})")

    out = sys.stderr if args.json == "-" else sys.stdout
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _build.cpu_model(),
        "logical_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "roundpipe": roundpipe.__version__,
        "roundpipe_native": rp_engine.native_available(),
        "kernel_artefact": getattr(_build.INFO, "artefact", None),
        "chunk_elems": rp_engine.CHUNK_ELEMS,
        "serial_below": rp_engine.SERIAL_BELOW,
        "deepspeed": "available" if args.deepspeed_cls is not None else f"skipped: {ds_why}",
        "peers": peers,
        "argv": sys.argv[1:] if argv is None else argv,
        "mix_config": mix_cfg,
        "lora_config": lora_cfg,
        "git": git_state(),
        "loadavg_start": os.getloadavg(),
    }
    print(f"# roundpipe optimizer benchmark  {meta['date']}", file=out)
    print(f"# CPU: {meta['cpu']} ({meta['logical_cpus']} logical CPUs); torch {meta['torch']}; "
          f"python {meta['python']}; roundpipe native kernel: {meta['roundpipe_native']}", file=out)
    print(f"# roundpipe at {meta['git']}", file=out)
    print(f"# deepspeed: {meta['deepspeed']}; CHUNK_ELEMS={meta['chunk_elems']}, SERIAL_BELOW={meta['serial_below']}",
          file=out)
    if peers:
        print("# other peers: " + "; ".join(f"{k}: {v}" for k, v in peers.items()), file=out)
    print("# load average at start (1/5/15 min): " + " ".join(f"{x:.2f}" for x in meta["loadavg_start"])
          + f" on {os.cpu_count()} CPUs: anything well above 0 means other work shares the machine", file=out)
    print(f"# median of {args.reps} timed rounds after {args.warmup} warm-up; competitors interleaved; "
          f"GB/s = elements x B/el (nominal one-pass bytes)", file=out)
    out.flush()

    mix = Workload("transformer mix", transformer_shapes(**mix_cfg),
                   "GPT-2-like " + ",".join(f"{k}={v}" for k, v in mix_cfg.items()) + ".")
    mixed = Workload("transformer mix", transformer_shapes(**mixed_cfg),
                     "GPT-2-like " + ",".join(f"{k}={v}" for k, v in mixed_cfg.items()) + ".")
    big = Workload("big tensor", [(args.big,)])
    small = Workload(f"many small ({args.small_count} x {args.small_size})", [(args.small_size,)] * args.small_count)
    tiny = Workload(f"tiny ({args.tiny} elements)", [(args.tiny,)])
    lora = Workload(f"LoRA mix ({lora_cfg['layers']} layers, d={lora_cfg['d']}, r={lora_cfg['r']})",
                    lora_shapes(**lora_cfg), "LoRA adapters (A, B) on q, k, v, out, fc1, fc2, with biases and norms: "
                    + ",".join(f"{k}={v}" for k, v in lora_cfg.items()) + ".")
    hyper = {"sgd": SGD_KW, "adagrad": ADAGRAD_KW, "lion": LION_KW}
    family: list[tuple[str, Workload, str]] = []  # (key, workload, optimizer)
    for opt, title in FAMILY.items():
        kw = ", ".join(f"{k}={v}" for k, v in hyper[opt].items())
        for lay, w in (("mix", mix), ("small", small), ("lora", lora)):
            note = f"{title} ({kw}). {w.note}".strip()
            family.append((f"{opt}-{lay}", Workload(f"{title}: {w.name}", w.shapes, note), opt))

    results: list[Result] = []
    extra: dict[str, Any] = {}
    before_threads = torch.get_num_threads()
    try:
        for th in thread_list:
            torch.set_num_threads(th)
            todo: list[tuple[str, Callable[[], Any]]] = [
                ("big", lambda th=th: bench_fp32(big, args, th, warmup=args.warmup, reps=args.reps)),
                ("mix", lambda th=th: bench_fp32(mix, args, th, warmup=args.warmup, reps=args.reps)),
                ("small", lambda th=th: bench_fp32(small, args, th, warmup=args.warmup, reps=args.reps)),
                ("lora", lambda th=th: bench_fp32(lora, args, th, warmup=args.warmup, reps=args.reps)),
                ("tiny", lambda th=th: bench_fp32(tiny, args, th, warmup=args.warmup, reps=args.overhead_rounds,
                                            inner=args.overhead_inner, kind="overhead")),
                ("in-backward", lambda th=th: bench_in_backward(args, th)),
                ("per-tensor", lambda th=th: bench_per_tensor(args, th)),
                ("master-weights", lambda th=th: bench_master_weights(
                    Workload("mixed: bf16 params, master_weights=True", mixed.shapes, mixed.note), args, th)),
                ("bf16", lambda th=th: bench_low_precision_params(
                    Workload("mixed: bf16 params and state (no master)", mixed.shapes, mixed.note), args, th)),
                ("fp16", lambda th=th: bench_low_precision_params(
                    Workload("mixed: fp16 params and state (no master)", mixed.shapes, mixed.note), args, th,
                    torch.float16)),
                ("grad-scaler", lambda th=th: bench_grad_scaler(
                    Workload("GradScaler: unscale + step", mix.shapes, mix.note), args, th)),
                ("lowmem", lambda th=th: bench_low_memory(
                    Workload("low-memory layouts", mixed.shapes, mixed.note), args, th)),
            ]
            todo += [(key, lambda w=w, opt=opt, th=th: bench_fp32(
                w, args, th, warmup=args.warmup, reps=args.reps, optimizer=opt)) for key, w, opt in family]
            for key, fn in todo:
                if key not in wanted:
                    continue
                wait_idle(args.wait_idle)
                load = ForeignLoad()
                got = fn()
                foreign = load.fraction()
                for res in (got if isinstance(got, list) else [got]):
                    if res is None:
                        continue
                    res.foreign_load = foreign
                    res.key = key
                    results.append(res)
                    if res.kind == "per-tensor":
                        print_per_tensor(res, out)
                    elif res.rows:
                        print_result(res, out)
                    else:
                        print(f"\n## {res.workload}: {res.note}", file=out)
                    out.flush()
        torch.set_num_threads(thread_list[-1] if len(thread_list) == 1 else before_threads)
        if args.sweep_serial:
            wait_idle(args.wait_idle)
            load = ForeignLoad()
            sw = sweep_serial(args)
            sw["foreign_load"] = load.fraction()
            extra["sweep_serial"] = sw
            print_sweep_serial(sw, out)
        if args.chunk_sweep:
            wait_idle(args.wait_idle)
            load = ForeignLoad()
            cs = chunk_sweep(args, [small, big])
            for r in cs:
                r.foreign_load = load.fraction()
            extra["chunk_sweep"] = [r.to_json() for r in cs]
            for r in cs:
                print_result(r, out)
        if args.profile:
            wait_idle(args.wait_idle)
            load = ForeignLoad()
            text = profile_step(args)
            text += f"\n(other processes used {load.fraction() or 0:.0%} of the CPUs meanwhile)"
            extra["profile"] = text
            print(f"\n## profile of roundpipe step() ({torch.get_num_threads()} threads)", file=out)
            print(text, file=out)
            if args.profile_out:
                with open(args.profile_out, "w") as f:
                    f.write(text + "\n")
    finally:
        torch.set_num_threads(before_threads)

    print_scaling(results, out)
    checks = check_targets(results)
    extra["targets"] = checks
    print_targets(checks, out)
    meta["loadavg_end"] = os.getloadavg()
    meta["rounds_discarded_for_foreign_load"] = ROUND_STATS["discarded"]
    if args.max_foreign is not None:
        print(f"# rounds timed again because other processes used > {args.max_foreign:.0%} of the CPUs: "
              f"{ROUND_STATS['discarded']}; disturbed rounds kept when the retry budget ran out: "
              f"{ROUND_STATS['kept_disturbed']}", file=out)
    meta["disturbed_rounds_kept"] = ROUND_STATS["kept_disturbed"]
    print("\n# load average at end (1/5/15 min): " + " ".join(f"{x:.2f}" for x in meta["loadavg_end"]), file=out)
    if args.json:
        doc = {"meta": meta, "results": [r.to_json() for r in results], **extra}
        if args.json == "-":
            json.dump(doc, sys.stdout, indent=1)
            print()
        else:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
    if args.plot:
        if not plot_results(results, meta, args.plot):
            print(f"bench.py: --plot: no throughput workload produced results; {args.plot} not written",
                  file=sys.stderr)
            return 1
        print(f"# chart: {args.plot}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

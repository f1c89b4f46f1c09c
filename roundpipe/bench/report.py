"""What the bench prints: the machine, one table per workload, the speed-up summary and the targets.

Column meanings: ``ms/step`` and ``min ms`` are the median and fastest timed
step; ``Gelem/s`` elements per second; ``B/el`` the bytes an ideal one-pass
step moves per element; ``GB/s`` elements x B/el per second (*nominal*: torch's
multi-pass steps move more than that, their GB/s is what one pass would need
for the same time); ``x roof`` that GB/s over the roofline probe's; ``speedup``
each competitor's median time over the reference's (roundpipe's).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from typing import Any

import torch

from . import competitors as C
from .timing import Result, ratio
from .workloads import LAYOUTS, split_key


def fmt_elems(n: int) -> str:
    """1048576 -> '1M', 1000 -> '1000', 110_000_000 -> '104.9M' (binary units)."""
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= div:
            v = n / div
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return str(n)


# ---- the machine ------------------------------------------------------------------------------


def git_state() -> str:
    """The commit of the roundpipe being measured, and whether its sources differ from it."""
    import roundpipe

    root = os.path.dirname(os.path.dirname(os.path.abspath(roundpipe.__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return "not a git checkout"  # an installed wheel
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


def machine(threads: list[int]) -> dict[str, Any]:
    """What a result depends on, for pasting into an issue: CPU, cores, threads, SIMD, torch."""
    import roundpipe
    import roundpipe.optim._engine as rp_engine
    from roundpipe import _build, _threads
    from roundpipe.__main__ import _simd_features

    native = rp_engine.native_available()
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        capability = "unknown"
    return {
        "cpu": _build.cpu_model(),
        "arch": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "cores_available": _threads.available_cores(),
        "threads": threads,
        "simd": _simd_features(_build.INFO.key_inputs) if native else "none: roundpipe's kernel did not build",
        "kernel": "native" if native else f"fallback ({_build.INFO.error or 'no kernel'})",
        "torch": torch.__version__,
        "torch_cpu_capability": capability,
        "python": platform.python_version(),
        "roundpipe": roundpipe.__version__,
        "os": platform.platform(terse=True),
    }


def print_header(meta: dict[str, Any], args: Any, out: Any) -> None:
    m = meta["machine"]
    print(f"# roundpipe optimizer benchmark  {meta['date']}", file=out)
    print(f"# CPU: {m['cpu']} ({m['arch']}, {m['logical_cpus']} logical CPUs, {m['cores_available']} available); "
          f"threads: {','.join(map(str, m['threads']))}; {m['os']}", file=out)
    print(f"# roundpipe {m['roundpipe']} ({meta['git']}), kernel {m['kernel']}, SIMD: {m['simd']}", file=out)
    print(f"# torch {m['torch']} (CPU capability {m['torch_cpu_capability']}); python {m['python']}", file=out)
    print(f"# deepspeed: {meta['deepspeed']}; CHUNK_ELEMS={meta['chunk_elems']}, SERIAL_BELOW={meta['serial_below']}",
          file=out)
    if meta["peers"]:
        print("# other peers: " + "; ".join(f"{k}: {v}" for k, v in meta["peers"].items()), file=out)
    print(f"# command: {meta['command']}", file=out)
    print("# load average at start (1/5/15 min): " + " ".join(f"{x:.2f}" for x in meta["loadavg_start"])
          + f" on {os.cpu_count()} CPUs: anything well above 0 means other work shares the machine", file=out)
    print(f"# median of {args.reps} timed rounds after {args.warmup} warm-up; competitors interleaved; "
          f"GB/s = elements x B/el (nominal one-pass bytes)", file=out)
    out.flush()


def new_meta(args: Any, argv: list[str] | None, threads: list[int], peers: C.PeerStatus,
             selected: list[C.OptimizerSpec], mix_cfg: dict[str, int], lora_cfg: dict[str, int]) -> dict[str, Any]:
    import roundpipe.optim._engine as rp_engine
    from roundpipe import _build

    m = machine(threads)
    given = sys.argv[1:] if argv is None else list(argv)
    adam_ds = next(p for p in C.ADAM.peers if p.package == C.DEEPSPEED)
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": m,
        # the keys before "machine" existed: kept for scripts that read them
        "cpu": m["cpu"], "logical_cpus": m["logical_cpus"], "python": m["python"], "torch": m["torch"],
        "roundpipe": m["roundpipe"], "roundpipe_native": m["kernel"] == "native",
        "kernel_artefact": getattr(_build.INFO, "artefact", None),
        "chunk_elems": rp_engine.CHUNK_ELEMS,
        "serial_below": rp_engine.SERIAL_BELOW,
        "deepspeed": (peers.status(adam_ds.label) if peers.status(adam_ds.label).startswith(("available", "not "))
                      else f"skipped: {peers.status(adam_ds.label)}"),
        "peers": {p.label: peers.status(p.label) for s in selected if s.key != "adam" for p in s.peers},
        "optimizers": {s.key: ("available" if C.available(s) else C.not_available_note(s)) for s in selected},
        "argv": given,
        "command": " ".join(["python -m roundpipe bench", *given]),
        "mix_config": mix_cfg,
        "lora_config": lora_cfg,
        "git": git_state(),
        "loadavg_start": os.getloadavg(),
    }


# ---- one table per workload ---------------------------------------------------------------------


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
        print_missing(res, w, out)
        return
    print(f"{'competitor':<{w}} {'ms/step':>9} {'min ms':>9} {'Gelem/s':>8} {'B/el':>5} {'GB/s':>7} {'x roof':>7} "
          f"{'speedup':>8}", file=out)
    for n, r in res.rows.items():
        ratio = r.get(f"{res.ref}_speedup")
        frac = r["frac_roofline"]
        print(f"{n:<{w}} {r['median_s'] * 1e3:>9.2f} {r['min_s'] * 1e3:>9.2f} {r['gelem_s']:>8.3f} "
              f"{r['bytes_per_elem']:>5g} {r['gb_s']:>7.2f} {(f'{frac:.3f}' if frac is not None else '-'):>7} "
              f"{(f'{ratio:.2f}x' if ratio else '-'):>8}", file=out)
    print_missing(res, w, out)


def print_missing(res: Result, w: int, out: Any) -> None:
    """A line for each competitor that has no row: not installed, not in this torch, failed to build."""
    for n, why in res.missing.items():
        print(f"{n:<{w}} {why}", file=out)



def print_per_tensor(res: Result, out: Any) -> None:
    print(f"\n## {res.workload}, {res.threads} threads\n   {res.note}", file=out)
    if res.foreign_load is not None:
        print(f"   other processes used {res.foreign_load:.0%} of the CPUs meanwhile", file=out)
    counts = list(next(iter(res.rows.values()))["points_us"])
    print(f"{'competitor':<16}" + "".join(f"{'N=' + c:>11}" for c in counts) + f"{'us/tensor':>11}", file=out)
    for name, r in res.rows.items():
        print(f"{name:<16}" + "".join(f"{r['points_us'][c]:>11.1f}" for c in counts)
              + f"{r['per_tensor_us']:>11.3f}", file=out)



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
            add(th, res.workload, "speedup vs torch-fused", ratio(res, "roundpipe", "torch-fused"), 1.1)
            add(th, res.workload, "speedup vs torch-default", ratio(res, "roundpipe", "torch-default"), 5.0)
        elif res.workload.startswith("many small") and rp:
            add(th, res.workload, "roundpipe / roofline", rp["frac_roofline"], 0.85)
            add(th, res.workload, "speedup vs torch-fused", ratio(res, "roundpipe", "torch-fused"), 1.5)
            add(th, res.workload, "speedup vs torch-default", ratio(res, "roundpipe", "torch-default"), 3.0)
        elif res.key == "lora" and rp:
            add(th, res.workload, "speedup vs torch-fused", ratio(res, "roundpipe", "torch-fused"), 1.5)
            add(th, res.workload, "speedup vs torch-default", ratio(res, "roundpipe", "torch-default"), 3.0)
        elif split_key(res.key)[0] is not C.ADAM and rp:
            spec, layout = split_key(res.key)
            for g in spec.goals:
                if layout not in g.layouts:
                    continue
                if g.against == "roofline":
                    add(th, res.workload, "roundpipe / roofline", rp["frac_roofline"], g.goal)
                else:
                    add(th, res.workload, f"speedup vs {g.against}", ratio(res, "roundpipe", g.against), g.goal)
        elif res.workload.startswith("tiny") and rp and "torch-fused" in res.rows:
            add(th, res.workload, "roundpipe us/step / torch-fused us/step",
                rp["median_s"] / res.rows["torch-fused"]["median_s"], 1.0, higher_better=False)
        elif "master_weights" in res.workload:
            add(th, res.workload, "speedup vs torch seq (foreach_copy)",
                ratio(res, "roundpipe master_weights", "torch seq (foreach_copy)"), 1.5)
            add(th, res.workload, "speedup vs torch seq (grad.float())",
                ratio(res, "roundpipe master_weights", "torch seq (grad.float())"), 1.5)
        elif res.workload == "low-memory layouts" and "fp32 moments" in res.rows:
            # issue 12 section 1 and 3: bf16 moments <= 0.8x the fp32-moment step; stochastic rounding
            # within 10% of the round-to-nearest bf16 step; issue 26: AdamW8bit <= 0.85x the fp32 step
            for what, a, b, goal in (("bf16 moments time / fp32 moments time", "bf16 moments", "fp32 moments", 0.8),
                                     ("AdamW8bit time / fp32 moments time", "8-bit moments (AdamW8bit)",
                                      "fp32 moments", 0.85),
                                     ("stochastic rounding time / bf16 params time",
                                      "bf16 params, stochastic rounding", "bf16 params", 1.1)):
                speedup = ratio(res, a, b)
                add(th, res.workload, what, 1.0 / speedup if speedup else None, goal, higher_better=False)
        elif res.workload.startswith("GradScaler"):
            add(th, res.workload, "via GradScaler: speedup vs torch-fused",
                ratio(res, "roundpipe via GradScaler", "torch-fused via GradScaler"), 1.3)
            add(th, res.workload, "via GradScaler: speedup vs torch-foreach",
                ratio(res, "roundpipe via GradScaler", "torch-foreach via GradScaler"), 1.3)
            add(th, res.workload, "via GradScaler: speedup vs torch-default",
                ratio(res, "roundpipe via GradScaler", "torch-default via GradScaler"), 1.3)
            add(th, res.workload, "direct step(): speedup vs torch-fused",
                ratio(res, "roundpipe step(grad_scale,found_inf)", "torch-fused step(grad_scale,found_inf)"), 1.3)
    return checks


def print_targets(checks: list[dict[str, Any]], out: Any) -> None:
    if not checks:
        return
    print("\n## targets (issue 4 section 3; issue 5 section 5; issue 11 section 7; issues 23, 25 and 26), "
          "set for 2 threads", file=out)
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



# ---- the speed-up summary -----------------------------------------------------------------------


def summary_rows(results: list[Result]) -> list[dict[str, Any]]:
    """One row per optimizer workload (fp32, the registry's layouts): roundpipe's speed-up over each competitor."""
    rows = []
    for res in results:
        spec, layout = split_key(res.key)
        if layout not in LAYOUTS or res.kind != "throughput":
            continue
        rp = res.rows.get("roundpipe")
        row: dict[str, Any] = {"optimizer": spec.name, "workload": res.workload, "key": res.key,
                               "threads": res.threads, "numel": res.numel,
                               "roundpipe_ms": rp["median_s"] * 1e3 if rp else None,
                               "x_roof": rp["frac_roofline"] if rp else None,
                               "speedup": {}, "missing": dict(res.missing), "foreign_load": res.foreign_load}
        for name in res.rows:
            if name not in ("roundpipe", "roofline-probe"):
                row["speedup"][name] = ratio(res, "roundpipe", name)
        if not rp and not res.missing:
            row["missing"] = {"roundpipe": res.note}
        rows.append(row)
    return rows


def print_summary(rows: list[dict[str, Any]], out: Any) -> None:
    """The table --quick is for: per optimizer, how many times faster roundpipe's step is than each other."""
    if not rows:
        return
    variants = [f"torch-{v}" for v in ("fused", "foreach", "default")]
    print("\n## speed-up of roundpipe's step over each implementation (its median time / roundpipe's; "
          "> 1: roundpipe is faster)", file=out)
    print(f"{'optimizer':<10} {'workload':<22} {'thr':>3} {'elements':>8} {'rp ms':>8} {'x roof':>6} "
          + " ".join(f"{v:>13}" for v in variants) + "  others", file=out)
    for r in rows:
        wl = r["workload"].partition(": ")[2] or r["workload"]
        lead = f"{r['optimizer']:<10} {wl[:22]:<22} {r['threads']:>3} {fmt_elems(r['numel']):>8}"
        if r["roundpipe_ms"] is None:
            print(f"{lead} {r['missing'].get('roundpipe', 'no result')}", file=out)
            continue
        cells = []
        for v in variants:
            s = r["speedup"].get(v)
            cells.append(f"{s:>12.2f}x" if s is not None else f"{'n/a' if v in r['missing'] else '-':>13}")
        others = [f"{n} {s:.2f}x" for n, s in r["speedup"].items() if n not in variants and s is not None]
        others += [f"{n}: {why.partition(' (')[0]}" for n, why in r["missing"].items()
                   if n not in variants and n != "roundpipe"]
        roof = f"{r['x_roof']:.2f}" if r["x_roof"] is not None else "-"
        print(f"{lead} {r['roundpipe_ms']:>8.2f} {roof:>6} " + " ".join(cells) + "  " + "; ".join(others), file=out)
    print("   -: torch has no such implementation of the rule; n/a: it did not run here (see the table above)",
          file=out)
    busy = max((r["foreign_load"] or 0.0 for r in rows), default=0.0)
    if busy > NOISY_LOAD:
        print(f"   WARNING: other processes used up to {busy:.0%} of the CPUs while these ran: the speed-ups are "
              "noisy. Rerun on an idle machine, or with --max-foreign 0.1 (rounds disturbed by others are "
              "timed again).", file=out)


NOISY_LOAD = 0.25  # other processes' share of the CPUs above which the summary warns

"""``python -m roundpipe bench``: the command line, and the run it drives."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import competitors as C
from . import progress, workloads
from .workloads import ADAM_WORKLOADS, LAYOUTS, workload_key

EPILOG = """\
examples:
  python -m roundpipe bench --quick                   # under a minute: every optimizer's speed-up table
  python -m roundpipe bench --quick --optimizer adamw,sgd
  python -m roundpipe bench                           # every workload (minutes; a progress bar says how many)
  python -m roundpipe bench --optimizer nadam         # one optimizer: its mix, small and LoRA workloads
  python -m roundpipe bench --workloads mix,lora --threads 1,2 --json out.json --plot bench.png

Workloads: Adam runs big, mix, small, lora, tiny, in-backward, per-tensor, master-weights, bf16, fp16,
grad-scaler and lowmem; every other optimizer runs <optimizer>-mix, -small and -lora (sgd-mix, ...).
In --workloads an optimizer's name stands for its three; with --optimizer, mix, small and lora mean
each chosen optimizer's.

Shared machines: each table says what share of the CPUs other processes used while it ran.
--max-foreign F times a round again when others used more than F of the CPUs during it (for up to
--retry-budget seconds per workload; rounds kept after that are counted as DISTURBED), and
--wait-idle S waits up to S seconds for a quiet machine before each workload.
"""

QUICK_MIX = "layers=1,d=384,vocab=4000,ctx=256,mlp=4"  # 3.4M elements in 20 tensors: past the caches
SMOKE_MIX = "layers=1,d=128,vocab=1000,ctx=64,mlp=4"  # the tests' sizes


def int_list(text: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def peer_packages() -> list[str]:
    """The third-party packages some optimizer's peers come from, each with its --no-<package> switch."""
    return sorted({p.package for s in C.OPTIMIZERS for p in s.peers})


def build_parser(prog: str = "python -m roundpipe bench") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Optimizer step throughput on this machine: roundpipe against torch's implementations "
                    "of the same rule (fused, foreach, default), third-party ones when installed, and the "
                    "memory roofline, timed interleaved and side by side.")
    ap.add_argument("--optimizer", default="",
                    help="comma-separated optimizers (default: all): " + ",".join(s.key for s in C.OPTIMIZERS))
    ap.add_argument("--quick", action="store_true",
                    help="under a minute: each optimizer's transformer mix (3.4M elements), few rounds, "
                         "and the speed-up table")
    ap.add_argument("--threads", type=int_list, default=[], help="comma-separated thread counts (default: torch's)")
    ap.add_argument("--workloads", default=None,
                    help="which workloads to run (comma-separated; an optimizer's name stands for its -mix, "
                         "-small and -lora workloads)")
    ap.add_argument("--json", default="", help="write results as JSON to this path ('-' for stdout)")
    ap.add_argument("--plot", default="", metavar="FILE.png",
                    help="draw each throughput workload's Gelem/s against the roofline (needs matplotlib: "
                         "pip install 'roundpipe[bench]')")
    ap.add_argument("--progress", choices=("auto", "bar", "lines", "off"), default="auto",
                    help="progress on stderr: a bar on a terminal, a line per workload elsewhere (auto)")
    sizes = ap.add_argument_group("sizes and rounds")
    sizes.add_argument("--big", type=int, default=64 << 20, help="elements of the one big tensor")
    sizes.add_argument("--mix", default="",
                       help="transformer mix config, e.g. layers=6,d=1024,vocab=32000,ctx=2048,mlp=4")
    sizes.add_argument("--lora", default="", help="LoRA mix config, e.g. layers=12,d=768,r=8,mlp=4")
    sizes.add_argument("--small-count", type=int, default=4096)
    sizes.add_argument("--small-size", type=int, default=8192)
    sizes.add_argument("--tiny", type=int, default=1000, help="elements of the tiny workload")
    sizes.add_argument("--mixed-scale", default="",
                       help="mix config for the mixed-precision workloads (default: --mix)")
    sizes.add_argument("--warmup", type=int, default=2)
    sizes.add_argument("--reps", type=int, default=9)
    sizes.add_argument("--overhead-rounds", type=int, default=31, help="timed rounds for per-call workloads")
    sizes.add_argument("--overhead-inner", type=int, default=200, help="calls per round for per-call workloads")
    sizes.add_argument("--ib-width", type=int, default=256)
    sizes.add_argument("--ib-depth", type=int, default=8)
    sizes.add_argument("--new-grads", action="store_true",
                       help="fresh grad tensor objects every step (as after zero_grad(set_to_none=True))")
    # the tests' sizes: every code path in seconds (not a measurement)
    sizes.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    peers = ap.add_argument_group("third-party competitors (each joins when it imports)")
    for pkg in peer_packages():
        peers.add_argument(f"--no-{pkg}", action="store_true", dest=f"no_{pkg.replace('-', '_')}",
                           help=f"leave {pkg}'s optimizers out")
    noise = ap.add_argument_group("shared machines")
    noise.add_argument("--max-foreign", type=float, default=None,
                       help="time a round again when other processes used more than this share of the CPUs")
    noise.add_argument("--retry-budget", type=float, default=300.0,
                       help="seconds per workload for timing disturbed rounds again (with --max-foreign)")
    noise.add_argument("--wait-idle", type=float, default=0.0,
                       help="before each workload, wait up to this many seconds for other processes to go quiet")
    dev = ap.add_argument_group("roundpipe's tuning (for its developers)")
    dev.add_argument("--sweep-serial", action="store_true", help="measure the single-thread threshold")
    dev.add_argument("--sweep-reps", type=int, default=15)
    dev.add_argument("--chunk-sweep", action="store_true", help="measure CHUNK_ELEMS choices")
    dev.add_argument("--chunks", type=int_list, default=[2048, 4096, 8192, 16384, 32768, 65536, 262144])
    dev.add_argument("--profile", action="store_true", help="profile roundpipe's step() Python path")
    dev.add_argument("--profile-out", default="", help="also write the profile text to this path")
    return ap


def apply_presets(args: argparse.Namespace) -> None:
    """--quick and --smoke: small sizes and few rounds (the flags given explicitly still win for --mix/--lora)."""
    if args.smoke:
        args.quick = True
    args.small_run = args.quick
    if not args.quick:
        return
    if not args.mix and not args.mixed_scale:
        args.mixed_scale = SMOKE_MIX  # the mixed-precision workloads, when asked for, stay small
    args.big = 1 << 18
    args.mix = args.mix or (SMOKE_MIX if args.smoke else QUICK_MIX)
    args.lora = args.lora or "layers=2,d=64,r=4,mlp=4"
    args.small_count, args.small_size = 32, 1024
    args.warmup, args.reps = 1, 3 if args.smoke else 5
    args.overhead_rounds, args.overhead_inner = 3, 20
    args.ib_width, args.ib_depth = 32, 2
    args.sweep_reps = 3
    args.chunks = [4096, 16384]


def parse_optimizers(text: str, ap: argparse.ArgumentParser) -> list[C.OptimizerSpec]:
    if not text:
        return list(C.OPTIMIZERS)
    by_name = {**{s.name.lower(): s for s in C.OPTIMIZERS}, **C.BY_KEY}
    chosen: list[C.OptimizerSpec] = []
    for name in (t.strip().lower() for t in text.split(",") if t.strip()):
        if name not in by_name:
            ap.error(f"--optimizer: unknown {name!r}; choose from {','.join(C.BY_KEY)}")
        if by_name[name] not in chosen:
            chosen.append(by_name[name])
    return chosen


def select_workloads(args: argparse.Namespace, specs: list[C.OptimizerSpec], optimizer_given: bool,
                     ap: argparse.ArgumentParser) -> list[str]:
    """The --workloads names to run, in the bench's order."""
    known = workloads.all_workloads()
    if args.workloads is None:
        if args.quick:
            wanted = {workload_key(s, "mix") for s in specs}
        else:
            wanted = {k for s in specs for k in (ADAM_WORKLOADS if s.key == "adam"
                                                  else [workload_key(s, lay) for lay in LAYOUTS])}
    else:
        wanted = set()
        for name in (t.strip() for t in args.workloads.split(",") if t.strip()):
            if name in C.BY_KEY and name != "adam":  # "sgd" = sgd-mix, sgd-small, sgd-lora
                wanted |= {workload_key(C.BY_KEY[name], lay) for lay in LAYOUTS}
            elif name == "adam":
                wanted |= set(ADAM_WORKLOADS)
            elif name in LAYOUTS and optimizer_given:  # each chosen optimizer's
                wanted |= {workload_key(s, name) for s in specs}
            elif name in known:
                wanted.add(name)
            else:
                ap.error(f"--workloads: unknown {name!r}; choose from {','.join(known)} "
                         f"or an optimizer's name ({','.join(k for k in C.BY_KEY if k != 'adam')})")
        if optimizer_given:
            wanted = {k for k in wanted if workloads.split_key(k)[0] in specs}
            if not wanted and args.workloads.strip():
                ap.error("--workloads and --optimizer chose no workload together")
    return [k for k in known if k in wanted]


def main(argv: Sequence[str] | None = None, prog: str = "python -m roundpipe bench") -> int:
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    apply_presets(args)
    specs = parse_optimizers(args.optimizer, ap)
    keys = select_workloads(args, specs, bool(args.optimizer), ap)
    if args.plot:  # fail before measuring for minutes, not after
        from . import plot

        why = plot.available()
        if why:
            ap.error(f"--plot needs matplotlib, which is not installed: pip install matplotlib "
                     f"(or the bench extra: pip install 'roundpipe[bench]') [{why}]")
        if not set(keys) & plot.plottable():
            ap.error(f"--plot draws the throughput workloads ({','.join(sorted(plot.plottable()))}); "
                     f"--workloads chose none of them")
    bar = progress.Progress(mode=args.progress)
    progress.current = bar
    try:
        return run(args, specs, keys, list(argv) if argv is not None else sys.argv[1:])
    except KeyboardInterrupt:
        bar.finish()
        print("roundpipe bench: interrupted", file=sys.stderr)
        return 130
    finally:
        bar.finish()
        progress.current = progress.Progress(mode="off")


def run(args: argparse.Namespace, specs: list[C.OptimizerSpec], keys: list[str], argv: list[str]) -> int:
    import torch

    from . import report, tuning
    from .timing import POLICY, ForeignLoad, Result, wait_idle

    import time

    import roundpipe.optim._engine as rp_engine

    t0 = time.monotonic()
    rp_engine.native_available()  # every rule's kernel: a cold cache compiles them now, not in the first table
    if time.monotonic() - t0 > 2.0:
        progress.log(f"compiled roundpipe's kernels for this CPU in {time.monotonic() - t0:.0f} s "
                     "(once per host: they are cached)")
    POLICY.max_foreign, POLICY.retry_budget_s = args.max_foreign, args.retry_budget
    POLICY.discarded = POLICY.kept_disturbed = 0
    shapes = workloads.Shapes(args)
    used = {workloads.split_key(k)[0] for k in keys}
    fp32_adam = bool(set(keys) & {"big", "mix", "small", "lora", "tiny"})
    peer_specs = [s for s in C.OPTIMIZERS if s in used and (s.key != "adam" or fp32_adam)]
    disabled = {p for p in peer_packages() if getattr(args, f"no_{p.replace('-', '_')}")}
    args.peer_status = C.resolve_peers(peer_specs, disabled)
    for label, why in args.peer_status.why.items():
        progress.log(f"{label}: {why}" if why.startswith("not installed") else f"{label}: skipped ({why})")
    thread_list = args.threads or [torch.get_num_threads()]
    out = sys.stderr if args.json == "-" else sys.stdout
    meta = report.new_meta(args, argv, thread_list, args.peer_status, [s for s in C.OPTIMIZERS if s in used],
                           shapes.mix_cfg, shapes.lora_cfg)
    if not fp32_adam:
        meta["deepspeed"] = "not looked up (no fp32 Adam workload)"
    report.print_header(meta, args, out)

    plan: list[tuple[int, workloads.Task]] = [(th, workloads.make_task(k, args, shapes, th))
                                              for th in thread_list for k in keys]
    extras = [("sweep-serial", args.sweep_serial, 20.0), ("chunk-sweep", args.chunk_sweep, 20.0),
              ("profile", args.profile, 10.0)]
    bar = progress.current
    bar.plan([(f"{t.label} ({th} thr)" if len(thread_list) > 1 else t.label, t.seconds) for th, t in plan]
             + [(name, s) for name, on, s in extras if on])

    results: list[Result] = []
    extra: dict[str, Any] = {}
    before_threads = torch.get_num_threads()
    try:
        for th, task in plan:
            torch.set_num_threads(th)
            bar.start_task(task.stages)
            wait_idle(args.wait_idle)
            load = ForeignLoad()
            got = task.run()
            foreign = load.fraction()
            for res in (got if isinstance(got, list) else [got]):
                if res is None:
                    continue
                res.foreign_load = foreign
                res.key = task.key
                results.append(res)
                bar.clear()
                if res.kind == "per-tensor":
                    report.print_per_tensor(res, out)
                elif res.rows:
                    report.print_result(res, out)
                else:
                    print(f"\n## {res.workload}: {res.note}", file=out)
                out.flush()
        torch.set_num_threads(thread_list[-1] if len(thread_list) == 1 else before_threads)
        if args.sweep_serial:
            bar.start_task()
            wait_idle(args.wait_idle)
            load = ForeignLoad()
            sw = tuning.sweep_serial(args)
            sw["foreign_load"] = load.fraction()
            extra["sweep_serial"] = sw
            bar.clear()
            report.print_sweep_serial(sw, out)
        if args.chunk_sweep:
            bar.start_task(2)
            wait_idle(args.wait_idle)
            load = ForeignLoad()
            cs = tuning.chunk_sweep(args, [shapes.small, shapes.big])
            for r in cs:
                r.foreign_load = load.fraction()
            extra["chunk_sweep"] = [r.to_json() for r in cs]
            bar.clear()
            for r in cs:
                report.print_result(r, out)
        if args.profile:
            bar.start_task()
            wait_idle(args.wait_idle)
            load = ForeignLoad()
            text = tuning.profile_step(args)
            text += f"\n(other processes used {load.fraction() or 0:.0%} of the CPUs meanwhile)"
            extra["profile"] = text
            bar.clear()
            print(f"\n## profile of roundpipe step() ({torch.get_num_threads()} threads)", file=out)
            print(text, file=out)
            if args.profile_out:
                with open(args.profile_out, "w") as f:
                    f.write(text + "\n")
    finally:
        torch.set_num_threads(before_threads)
        bar.finish()

    report.print_scaling(results, out)
    summary = report.summary_rows(results)
    extra["summary"] = summary
    report.print_summary(summary, out)
    checks = report.check_targets(results)
    extra["targets"] = checks
    report.print_targets(checks, out)
    meta["loadavg_end"] = os.getloadavg()
    meta["rounds_discarded_for_foreign_load"] = POLICY.discarded
    if args.max_foreign is not None:
        print(f"# rounds timed again because other processes used > {args.max_foreign:.0%} of the CPUs: "
              f"{POLICY.discarded}; disturbed rounds kept when the retry budget ran out: "
              f"{POLICY.kept_disturbed}", file=out)
    meta["disturbed_rounds_kept"] = POLICY.kept_disturbed
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
        from . import plot

        if not plot.plot_results(results, meta, args.plot):
            print(f"roundpipe bench: --plot: no throughput workload produced results; {args.plot} not written",
                  file=sys.stderr)
            return 1
        print(f"# chart: {args.plot}", file=out)
    return 0

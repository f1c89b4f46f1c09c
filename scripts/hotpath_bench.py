"""Step time of several roundpipe checkouts side by side, interleaved: the per-step checks' cost.

Each checkout (NAME=PATH, imported with PYTHONPATH=PATH) and torch's fused optimizer run in a
worker process of their own that keeps its params between rounds; every round asks each worker,
in a rotating order, for a few timed steps, so that load from other processes hits all of them
alike. Grads are new tensor objects every step (two sets, alternated before each step, untimed),
as after ``zero_grad(set_to_none=True)`` and backward.

Workloads:
  small:N:SIZE      N tensors of SIZE fp32 elements (issue 22: 4096 x 8192)
  lora              the LoRA adapter set of scripts/bench.py (266 tensors, 1.45M elements)
  per-tensor        the slope of step time over N tensors of 16 elements (16 and 4096 tensors),
                    warm (steps back to back) and cold (a 64 MiB write evicts the caches first)

    python scripts/hotpath_bench.py --opt adam --workload small:4096:8192 \\
        --checkout pre=/work/wt-pre --checkout main=/work/main --checkout ours=.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# ---- worker ------------------------------------------------------------------------------


def _lora_shapes(layers: int = 12, d: int = 768, r: int = 8, mlp: int = 4) -> list[tuple[int, ...]]:
    """scripts/bench.py's lora_shapes with its defaults."""
    shapes: list[tuple[int, ...]] = []
    h = mlp * d
    for _ in range(layers):
        for d_in, d_out in [(d, d)] * 4 + [(d, h), (h, d)]:
            shapes += [(r, d_in), (d_out, r)]
        shapes += [(d,)] * 4 + [(h,), (d,)]
        shapes += [(d,)] * 4
    return shapes + [(d,), (d,)]


def _make(opt: str, impl: str, shapes: list[tuple[int, ...]]):  # noqa: ANN202
    import torch
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    sets = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]
    kw = {"adam": dict(lr=1e-3), "sgd": dict(lr=1e-3, momentum=0.9), "adagrad": dict(lr=1e-2),
          "lion": dict(lr=1e-4)}[opt]
    if impl == "torch":
        cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}[opt]
        o = cls(params, fused=True, **kw)
    else:
        import roundpipe.optim as rpo
        o = {"adam": rpo.Adam, "sgd": getattr(rpo, "SGD", None), "adagrad": getattr(rpo, "Adagrad", None),
             "lion": getattr(rpo, "Lion", None)}[opt](params, **kw)
    return params, sets, o


def worker(opt: str, impl: str, workload: str, threads: int) -> None:
    """Read a line per round ("STEPS [cold]"), answer with that many step times as JSON: (wall, CPU,
    checks wall, checks CPU) seconds each: CPU time is the process's (all threads), the checks are
    the time in _plan (validation, before the C call), their CPU time the calling thread's."""
    import torch
    torch.set_num_threads(threads)
    if workload == "lora":
        shapes = _lora_shapes()
    elif workload.startswith("small:"):
        _, n, size = workload.split(":")
        shapes = [(int(size),)] * int(n)
    else:
        shapes = [(16,)] * int(workload.removeprefix("tiny:"))
    params, sets, o = _make(opt, impl, shapes)
    evict = torch.empty(16 * 1024 * 1024)  # 64 MiB: twice the L3
    k = 0
    checks = [0.0, 0.0]  # wall and this thread's CPU time in _plan (the checks) during one step
    if impl == "roundpipe":
        plan = type(o)._plan

        def timed_plan(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return plan(self, *a, **kw)
            finally:
                checks[0] += time.perf_counter() - t0
                checks[1] += time.thread_time() - c0
        type(o)._plan = timed_plan

    def step(cold: bool) -> tuple[float, float, float, float]:
        nonlocal k
        k += 1
        for p, g in zip(params, sets[k % 2], strict=True):
            p.grad = g
        if cold:
            evict.fill_(float(k))
        checks[:] = [0.0, 0.0]
        t0, c0 = time.perf_counter(), time.process_time()
        o.step()
        return time.perf_counter() - t0, time.process_time() - c0, *checks

    for _ in range(3):
        step(False)
    print("ready", flush=True)
    for line in sys.stdin:
        n, *flags = line.split()
        print(json.dumps([step("cold" in flags) for _ in range(int(n))]), flush=True)


# ---- driver ------------------------------------------------------------------------------


def run(opt: str, workload: str, checkouts: list[tuple[str, str]], torch_fused: bool, rounds: int,
        steps: int, threads: int, cold: bool) -> dict[str, list[list[float]]]:
    """Step times (wall, CPU) per checkout (and "torch fused"), interleaved round by round."""
    procs = {}
    impls = [(name, path, "roundpipe") for name, path in checkouts]
    if torch_fused and opt != "lion":
        impls.append(("torch fused", checkouts[-1][1], "torch"))
    for name, path, impl in impls:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(path)}
        procs[name] = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", opt, impl, workload,
                                        str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        if procs[name].stdout.readline().strip() != "ready":  # type: ignore[union-attr]
            raise SystemExit(f"{name}: worker failed")
    times: dict[str, list[list[float]]] = {name: [] for name in procs}
    names = list(procs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            p = procs[name]
            p.stdin.write(f"{steps}{' cold' if cold else ''}\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
            times[name] += json.loads(p.stdout.readline())  # type: ignore[union-attr]
    for p in procs.values():
        p.stdin.close()  # type: ignore[union-attr]
        p.wait()
    return times


def summary(ts: list[list[float]]) -> str:
    out = []
    for i, what in ((0, "wall"), (1, "CPU"), (2, "checks wall"), (3, "checks CPU")):
        xs = [t[i] for t in ts]
        q = statistics.quantiles(xs, n=4)
        out.append(f"{what} {statistics.median(xs) * 1e3:8.3f} ms (IQR {q[0] * 1e3:.3f}-{q[2] * 1e3:.3f})")
    return "   ".join(out) + f"   n={len(ts)}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:5], int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--opt", default="adam", choices=["adam", "sgd", "adagrad", "lion"])
    ap.add_argument("--workload", default="small:4096:8192")
    ap.add_argument("--checkout", action="append", default=[], help="NAME=PATH (repeatable)")
    ap.add_argument("--no-torch", action="store_true", help="leave out torch's fused optimizer")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per worker per round")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    checkouts = [tuple(c.split("=", 1)) for c in args.checkout] or [("here", ".")]
    print(f"# {args.opt} {args.workload}, {args.threads} threads, {args.rounds} rounds x {args.steps} steps, "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.workload != "per-tensor":
        times = run(args.opt, args.workload, checkouts, not args.no_torch, args.rounds, args.steps, args.threads, False)
        for name, ts in times.items():
            print(f"{name:12s} {summary(ts)}")
        return
    for cold in (False, True):
        at = {n: run(args.opt, f"tiny:{n}", checkouts, not args.no_torch, args.rounds, args.steps, args.threads, cold)
              for n in (16, 4096)}
        for name in at[16]:
            slopes = []
            for i in (0, 1, 2, 3):
                a, b = (statistics.median(t[i] for t in at[n][name]) for n in (16, 4096))
                slopes.append(f"{(b - a) / (4096 - 16) * 1e6:.3f} us")
            print(f"{name:12s} per tensor ({'cold' if cold else 'warm'}): wall {slopes[0]}, CPU {slopes[1]}, "
                  f"checks wall {slopes[2]}, checks CPU {slopes[3]};  "
                  f"4096 tensors {summary(at[4096][name])};  16 tensors {summary(at[16][name])}")

if __name__ == "__main__":
    main()

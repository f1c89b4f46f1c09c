"""The cold first step of each optimizer: its first import and first step, over `import torch`,
on an empty kernel cache, each in a fresh process (issue 23's <= 3 s bar).

Usage: python scripts/cold_first_step.py [--repeat N] [NAME ...]   (default: every optimizer)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

PROBE = """
import json, sys, time
import torch
t0 = time.perf_counter()
import roundpipe.optim as rpo
cls = getattr(rpo, sys.argv[1])
p = torch.nn.Parameter(torch.zeros(64, 64))
p.grad = torch.ones(64, 64)
opt = cls([p], lr=0.1) if sys.argv[1] != "Lion" else cls([p], lr=1e-4)
opt.step()
print(json.dumps({"seconds": time.perf_counter() - t0, "native": opt._kernel is not None}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import roundpipe.optim as rpo

    names = args.names or [n for n in rpo.__all__ if n[0].isupper() and n != "FusedOptimizer"]
    print(f"{'optimizer':<12} cold first step over import torch (median of {args.repeat}, fresh process, empty cache)")
    worst = 0.0
    for name in names:
        times = []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as cache:
                env = {"ROUNDPIPE_CACHE_DIR": cache, "PATH": __import__("os").environ.get("PATH", "")}
                res = subprocess.run([sys.executable, "-c", PROBE, name], capture_output=True, text=True,
                                     env=env, cwd=tempfile.gettempdir(), timeout=600)
                if res.returncode != 0:
                    print(f"{name:<12} failed: {res.stderr.strip().splitlines()[-1:]}")
                    break
                out = json.loads(res.stdout.strip().splitlines()[-1])
                if not out["native"]:
                    print(f"{name:<12} fell back to torch (no kernel)")
                    break
                times.append(out["seconds"])
        if times:
            med = statistics.median(times)
            worst = max(worst, med)
            print(f"{name:<12} {med:6.2f} s   ({', '.join(f'{t:.2f}' for t in times)})")
    print(f"slowest: {worst:.2f} s (target <= 3 s): {'ok' if worst <= 3 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

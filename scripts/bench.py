#!/usr/bin/env python
"""The optimizer benchmark from a checkout: the same as ``python -m roundpipe bench`` (roundpipe/bench/).

    python scripts/bench.py --quick                  # the speed-up table, under a minute
    python scripts/bench.py                          # every workload
    python scripts/bench.py --workloads sgd,lion     # one optimizer family's workloads
    python scripts/bench.py --plot bench.png --json out.json
    python scripts/bench.py --sweep-serial --chunk-sweep --profile   # the engine's tuning knobs

Every flag is roundpipe.bench's: ``python scripts/bench.py --help``. It runs
the roundpipe of this checkout (the directory above scripts/), installed or not.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from roundpipe.bench.cli import main  # noqa: E402  (after the path: this checkout's roundpipe)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="scripts/bench.py"))

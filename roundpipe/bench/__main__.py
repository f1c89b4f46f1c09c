"""``python -m roundpipe.bench``, the same as ``python -m roundpipe bench``."""

import sys

from .cli import main

sys.exit(main(prog="python -m roundpipe.bench"))

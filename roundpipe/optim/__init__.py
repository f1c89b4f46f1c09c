"""CPU-optimized Adam/AdamW, drop-in replacements for torch.optim.Adam/AdamW.

Importing this package compiles (once per host, then cached) and loads the C
kernel; see roundpipe._build.
"""

from .adam import Adam, AdamW, native_available
from .. import _build

_build.load_kernel()

__all__ = ["Adam", "AdamW", "native_available"]

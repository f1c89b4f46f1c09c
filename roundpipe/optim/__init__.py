"""CPU-optimized optimizers, drop-in replacements for torch.optim: Adam, AdamW, SGD, Adagrad, Adafactor and Lion.

Importing this package compiles (once per host, then cached) and loads the C
kernels; see roundpipe._build.
"""

from .. import _build
from ._engine import FusedOptimizer, native_available
from .adafactor import Adafactor
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .lion import Lion
from .sgd import SGD

_build.load_kernel()

__all__ = ["Adafactor", "Adagrad", "Adam", "AdamW", "FusedOptimizer", "Lion", "SGD", "native_available"]

"""CPU-optimized optimizers, drop-in replacements for torch.optim: Adam, AdamW, SGD, Adagrad, NAdam, ASGD and Lion.

Importing this package compiles (once per host, then cached) and loads the C
kernels; see roundpipe._build.
"""

from .. import _build
from ._engine import FusedOptimizer, native_available
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .asgd import ASGD
from .lion import Lion
from .nadam import NAdam
from .sgd import SGD

_build.load_kernel()

__all__ = ["ASGD", "Adagrad", "Adam", "AdamW", "FusedOptimizer", "Lion", "NAdam", "SGD", "native_available"]

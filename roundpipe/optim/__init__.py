"""CPU-optimized optimizers, drop-in replacements for torch.optim: Adam, AdamW, SGD, Adagrad, Adafactor,
NAdam, RAdam, Adamax, ASGD, RMSprop, Adadelta, Rprop and Lion; Adam8bit and AdamW8bit keep block-wise 8-bit moments.

Each optimizer's C kernel is compiled for this host the first time that optimizer is built
(once per host, then cached), or all of them by ``python -m roundpipe build``; see
roundpipe._build.
"""

from .. import _build
from ._engine import FusedOptimizer, native_available
from .adadelta import Adadelta
from .adafactor import Adafactor
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .adam8bit import Adam8bit, AdamW8bit
from .adamax import Adamax
from .asgd import ASGD
from .lion import Lion
from .nadam import NAdam
from .radam import RAdam
from .rmsprop import RMSprop
from .rprop import Rprop
from .sgd import SGD

# Kernels build on first use, one rule at a time (_build.load_kernel). ROUNDPIPE_REQUIRE_NATIVE=1
# promises an ImportError here when they cannot be built, so then every rule is built at import.
if _build._env_flag("ROUNDPIPE_REQUIRE_NATIVE"):
    _build.load_kernel()

__all__ = ["ASGD", "Adadelta", "Adafactor", "Adagrad", "Adam", "Adam8bit", "Adamax", "AdamW", "AdamW8bit",
           "FusedOptimizer", "Lion", "NAdam", "RAdam", "RMSprop", "Rprop", "SGD", "native_available"]

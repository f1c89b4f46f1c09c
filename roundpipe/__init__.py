"""roundpipe: a CPU-optimized Adam for PyTorch (see roundpipe.optim)."""

__version__ = "0.1.0"

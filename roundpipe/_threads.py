"""Warn when torchrun's one thread per rank leaves the host's other cores idle during a step.

torchrun sets ``OMP_NUM_THREADS=1`` in every rank (unless the user set it), so
``torch.get_num_threads()`` is 1 and the optimizer step, which is memory-bound
and scales with cores, runs on one core of a many-core host. We only say so,
once per process: the thread count is the user's to choose (several ranks may
share the cores, or other work may run beside the step).

Silence it with ``ROUNDPIPE_NO_THREAD_WARNING=1`` in the environment: torchrun
passes its environment to every rank, so one variable on the launch line covers
all of them, with no code change.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from types import FrameType

SILENCE_ENV = "ROUNDPIPE_NO_THREAD_WARNING"
# Variables torchrun (torch.distributed.elastic) sets in each rank it launches.
_TORCHRUN_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE")
_TRUE = ("1", "true", "yes", "on")

_checked = False  # warn_once has run in this process: every later call returns at once


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one, else all CPUs."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def thread_advice(env: Mapping[str, str], cores: int, threads: int) -> str | None:
    """The advice for a step on `threads` threads with `cores` cores and environment `env`, or None.

    Advice is given only for one thread, under torchrun, when each local rank
    could have two cores or more. A LOCAL_WORLD_SIZE that is missing or not a
    positive integer counts as one rank.
    """
    if threads != 1 or not any(name in env for name in _TORCHRUN_ENV):
        return None
    try:
        ranks = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        ranks = 1
    per_rank = cores // ranks
    if per_rank <= 1:
        return None
    omp = env.get("OMP_NUM_THREADS")
    why = "torchrun sets OMP_NUM_THREADS=1 in every rank" if omp == "1" else \
        f"OMP_NUM_THREADS={omp if omp is not None else 'unset'}"
    return (
        f"roundpipe: the optimizer steps on 1 thread under torchrun ({why}), but this host gives "
        f"{cores} cores to {ranks} local rank{'s' if ranks != 1 else ''}, so each rank's step could use "
        f"{per_rank}. Fix: call torch.set_num_threads({per_rank})  "
        f"(cores // LOCAL_WORLD_SIZE = {cores} // {ranks}) in each rank before training, or launch with "
        f"OMP_NUM_THREADS={per_rank}. Silence this warning with {SILENCE_ENV}=1."
    )


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside roundpipe and torch: the user's call to step()."""
    skip = [os.path.dirname(os.path.abspath(__file__))]
    torch_file = getattr(sys.modules.get("torch"), "__file__", None)
    if torch_file:
        skip.append(os.path.dirname(os.path.abspath(torch_file)))
    frame: FrameType | None = sys._getframe(1)  # level 1: warn_once's frame
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(tuple(skip)):
        frame, level = frame.f_back, level + 1
    return level


def warn_once() -> None:
    """Warn (RuntimeWarning) the first time it is called if thread_advice has advice; then nothing."""
    global _checked
    if _checked:
        return
    _checked = True
    if os.environ.get(SILENCE_ENV, "").strip().lower() in _TRUE:
        return
    import torch

    advice = thread_advice(os.environ, available_cores(), torch.get_num_threads())
    if advice is not None:
        warnings.warn(advice, RuntimeWarning, stacklevel=_caller_stacklevel())

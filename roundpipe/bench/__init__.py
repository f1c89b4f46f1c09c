"""``python -m roundpipe bench``: optimizer step throughput on this machine, roundpipe against the others.

Each optimizer of roundpipe's family is timed against torch's implementations of
the same rule (fused, foreach and the default for-loop, where torch has them),
third-party ones where they are installed (DeepSpeed's CPU optimizers,
lion-pytorch) and the memory roofline of its access pattern::

    python -m roundpipe bench --quick                  # under a minute: the speed-up table
    python -m roundpipe bench --optimizer adamw,nadam  # those optimizers' workloads
    python -m roundpipe bench --threads 1,2 --json out.json --plot bench.png

What is measured
----------------
An fp32 Adam step reads param, grad, exp_avg and exp_avg_sq and writes param,
exp_avg and exp_avg_sq: 28 bytes per element. SGD with momentum (param, grad,
momentum buffer) moves 20, and so on: each optimizer's entry in
:data:`roundpipe.bench.competitors.OPTIMIZERS` says how many bytes its fp32 step
must move. The *roofline* is a probe from roundpipe's own compiled kernel with
that access pattern and no arithmetic, over one contiguous set of arrays as long
as the workload: the memory upper bound of the step on this machine at this
moment, timed in the same rounds as the optimizers.

GB/s are *nominal*: elements x the bytes an ideal one-pass step moves (column
B/el). torch's default and foreach steps make several passes and move more;
their GB/s is what the ideal pass would need for the same time. "x roof" is the
nominal GB/s over the roofline's.

Method: all competitors of a workload share the same parameter and gradient
tensors (each optimizer keeps its own state), so memory holds one workload at a
time. Each round times one step of every competitor, in a rotating order, so
that drift on a noisy machine hits all of them alike; the first rounds are
warm-up and the median of the rest is reported (:mod:`roundpipe.bench.timing`).

The parts: :mod:`~roundpipe.bench.workloads` (the parameter sets and what each
workload times), :mod:`~roundpipe.bench.competitors` (the optimizer registry, the
peers, the roofline probes), :mod:`~roundpipe.bench.timing`,
:mod:`~roundpipe.bench.report` (the machine, the tables, the targets),
:mod:`~roundpipe.bench.plot`, :mod:`~roundpipe.bench.progress`,
:mod:`~roundpipe.bench.tuning` (the engine's knobs, for its developers) and
:mod:`~roundpipe.bench.cli`.
"""

from .cli import main

__all__ = ["main"]

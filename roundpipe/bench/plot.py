"""--plot: every throughput workload's Gelem/s against its roofline, as a PNG (needs matplotlib).

matplotlib is optional (``pip install 'roundpipe[bench]'``): :func:`available`
says whether it imports, and the CLI says "not installed" before measuring
anything rather than failing after minutes.
"""

from __future__ import annotations

from typing import Any

from . import competitors as C
from .report import fmt_elems
from .timing import Result
from .workloads import ADAM_PLOTTABLE, LAYOUTS, workload_key


def plottable() -> set[str]:
    """The --workloads names --plot can draw: those whose tables carry a roofline-probe row."""
    return ADAM_PLOTTABLE | {workload_key(s, lay) for s in C.OPTIMIZERS if s.key != "adam" for lay in LAYOUTS}


def available() -> str:
    """'' when matplotlib imports, else why not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        return f"matplotlib is not installed ({e})"
    return ""


def plot_results(results: list[Result], meta: dict[str, Any], path: str) -> int:
    """Grouped bars of every competitor's Gelem/s per workload, each against the roofline; returns bars drawn.

    The roofline of a bar is the probe's measured GB/s over that bar's bytes per element: the step's
    memory bound on this machine. In an fp32 workload every competitor moves the same bytes (28 B/el for
    Adam, 20 for SGD momentum, ..., each against its own probe: see competitors.OPTIMIZERS), so the bars of a workload
    share one roofline line; a mixed-precision competitor moving fewer bytes has a higher one.
    """
    import textwrap

    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    groups = [r for r in results if r.kind == "throughput" and "roofline-probe" in r.rows]
    if not groups:
        return 0
    thread_counts = sorted({r.threads for r in groups})
    names: list[str] = []  # every competitor, in order of first appearance: one colour each
    for r in groups:
        names += [n for n in r.rows if n != "roofline-probe" and n not in names]
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    colour = {n: cmap(i % cmap.N) for i, n in enumerate(names)}

    widest = max(len(r.rows) - 1 for r in groups)
    fig, axes = plt.subplots(len(thread_counts), 1, squeeze=False, sharey=True,
                             figsize=(max(8.0, 0.32 * widest * len(groups) / len(thread_counts) + 3),
                                      4.2 * len(thread_counts) + 1.4))
    drawn = 0
    for ax, th in zip(axes[:, 0], thread_counts, strict=True):
        mine = [r for r in groups if r.threads == th]
        labels = []
        for gi, r in enumerate(mine):
            comps = [n for n in r.rows if n != "roofline-probe"]
            width = 0.8 / len(comps)
            roof_gbs = r.rows["roofline-probe"]["gb_s"]
            for ci, n in enumerate(comps):
                row = r.rows[n]
                x = gi - 0.4 + width * (ci + 0.5)
                ax.bar(x, row["gelem_s"], width * 0.92, color=colour[n], label=n)
                # this bar's memory bound, as a black tick over it
                ax.hlines(roof_gbs / row["bytes_per_elem"], x - width / 2, x + width / 2, colors="black",
                          linewidth=2, label="roofline (probe GB/s / the bar's B/el)")
                drawn += 1
            title = r.workload if r.workload.startswith(r.optimizer) else f"{r.optimizer}: {r.workload}"
            labels.append("\n".join(textwrap.wrap(title, 22)) + f"\n{fmt_elems(r.numel)} el")
        ax.set_xticks(range(len(mine)), labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("Gelem/s (log)")
        ax.set_title(f"{th} thread{'s' if th != 1 else ''}", fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in axes[:, 0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(4, len(handles)), fontsize=8,
               frameon=False)
    fig.suptitle(f"Optimizer step throughput against the memory roofline: {meta['cpu']}, torch {meta['torch']}, "
                 f"roundpipe {meta['git']}, {meta['date'][:10]}", fontsize=10)
    rows_of_legend = -(-len(handles) // min(4, len(handles)))
    fig.tight_layout(rect=(0, 0.04 * rows_of_legend + 0.02, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn

"""A one-line progress bar on stderr: which workload, which competitor, about how long is left.

No dependency (tqdm is not one of roundpipe's). On a terminal the line is
redrawn in place; elsewhere (a log file, CI) it prints one plain line as each
workload starts, once the run has gone on for a few seconds. Messages printed
through :func:`log` clear the bar first, so the two never mix on one line.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any, TextIO


def fmt_seconds(s: float) -> str:
    """12 -> '12 s', 95 -> '1 min 35 s', 3700 -> '1 h 1 min'."""
    s = max(0, round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class Progress:
    """Progress over a list of tasks (workloads), each with an estimated cost in seconds.

    The time left is the estimate of the tasks not done yet, scaled by how the
    run has gone so far (the seconds spent over the estimate of what is done),
    so that a slow machine corrects a guess made for a fast one after the first
    workload.

    Args:
        stream: where to draw (stderr).
        mode: "auto" (a bar on a terminal, plain lines elsewhere), "bar", "lines" or "off".
        delay: seconds before anything is drawn: short runs stay quiet.
    """

    def __init__(self, stream: TextIO | None = None, mode: str = "auto", delay: float = 2.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"progress mode must be auto, bar, lines or off, got {mode!r}")
        self.mode = mode
        self.delay = delay
        self.t0 = time.monotonic()
        self.costs: list[float] = []
        self.labels: list[str] = []
        self.task = -1
        self.stage = 0  # run_rounds calls so far in this task
        self.stages = 1  # how many the task makes (tasks that time several tables declare it)
        self.fraction = 0.0  # of the current task
        self.detail = ""
        self.drawn = 0  # characters of the bar now on the line
        self.last_draw = 0.0

    # ---- planning -------------------------------------------------------------------------

    def plan(self, tasks: list[tuple[str, float]]) -> None:
        """The (label, estimated seconds) of every task, in the order they will run."""
        self.labels = [label for label, _ in tasks]
        self.costs = [max(cost, 1e-3) for _, cost in tasks]  # > 0: a task that is done has weight
        self.task = -1

    def start_task(self, stages: int = 1) -> None:
        """The next planned task begins; it will time `stages` tables (run_rounds calls)."""
        self.task += 1
        self.stage, self.stages, self.fraction, self.detail = 0, max(1, stages), 0.0, ""
        if self.mode == "lines" and self.elapsed() >= self.delay and self.task < len(self.costs):
            self._write_line(self._text(with_detail=False))
        self.draw(force=True)

    def begin_rounds(self) -> None:
        """A run_rounds call starts inside the current task."""
        self.stage += 1

    def rounds(self, done: int, total: int, competitor: str) -> None:
        """Round `done` of `total` is timing `competitor` (called before each competitor's step)."""
        stage = min(self.stage, self.stages) - 1 if self.stage else 0
        self.fraction = min(1.0, (stage + min(done, total) / max(total, 1)) / self.stages)
        self.detail = competitor
        self.draw()

    def finish(self) -> None:
        """Clear the bar (at the end of the run)."""
        self.clear()

    # ---- estimates ------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def seconds_left(self) -> float | None:
        if not self.costs or self.task < 0:
            return None
        i = min(self.task, len(self.costs))
        done = sum(self.costs[:i]) + (self.costs[i] * self.fraction if i < len(self.costs) else 0.0)
        left = sum(self.costs[i:]) - (self.costs[i] * self.fraction if i < len(self.costs) else 0.0)
        if done <= 0:
            return None  # "estimating": nothing measured yet to scale the plan's guess by
        if self.elapsed() < 1.0:
            return left  # the plan's own guess until the run has shown its pace
        return left * self.elapsed() / done

    def _text(self, with_detail: bool = True) -> str:
        n = len(self.costs)
        i = min(self.task, n - 1) if n else 0
        label = self.labels[i] if n else ""
        left = self.seconds_left()
        parts = [f"[{i + 1}/{n}] {label}"]
        if with_detail and self.detail:
            parts.append(self.detail)
        parts.append(f"~{fmt_seconds(left)} left" if left is not None else "estimating")
        return " | ".join(parts)

    # ---- drawing --------------------------------------------------------------------------

    def draw(self, force: bool = False) -> None:
        if self.mode != "bar" or self.task < 0 or self.elapsed() < self.delay:
            return
        now = time.monotonic()
        if not force and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
        n = len(self.costs)
        total = sum(self.costs) or 1.0
        i = min(self.task, n)
        done = (sum(self.costs[:i]) + (self.costs[i] * self.fraction if i < n else 0.0)) / total
        bar_w = 20
        filled = int(done * bar_w + 0.5)
        text = f"{'#' * filled}{'.' * (bar_w - filled)} {done:4.0%} {self._text()}"[:width]
        self.stream.write("\r" + text + " " * max(0, self.drawn - len(text)))
        self.stream.flush()
        self.drawn = len(text)

    def clear(self) -> None:
        if self.drawn:
            self.stream.write("\r" + " " * self.drawn + "\r")
            self.stream.flush()
            self.drawn = 0

    def _write_line(self, text: str) -> None:
        self.clear()
        print(text, file=self.stream, flush=True)


# The run's progress; the CLI sets it. Functions called directly (tests, scripts) draw nothing.
current: Progress = Progress(mode="off")


def log(*a: Any) -> None:
    """A message on stderr, on a line of its own (the bar cleared first and drawn again after)."""
    current.clear()
    print(*a, file=sys.stderr, flush=True)
    current.draw(force=True)

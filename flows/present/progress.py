"""Rich progress bars for long stage work (images/s for extraction).

Prefect tasks receive only paths and hashes, so the bar is process-local: the
CLI turns it on, tasks in the same process advance it, and tasks elsewhere (a
Dask worker) simply have none.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn,
                           TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

_active: Progress | None = None
_bar: "Bar | None" = None
_enabled = True


def rate_text(per_second: float, unit: str = "images") -> str:
    """A rate that stays readable when slow: ``41.3 images/s``, ``0.12 images/s``, and below one item
    per 10 s the time per item, ``12.4 s/image`` (a real-size tower on a CPU), never ``0.0 images/s``."""
    if per_second >= 1:
        return f"{per_second:.1f} {unit}/s"
    if per_second >= 0.1:
        return f"{per_second:.2f} {unit}/s"
    return f"{1 / per_second:.1f} s/{unit.removesuffix('s')}" if per_second > 0 else f"0 {unit}/s"


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``41.3 images/s`` (:func:`rate_text`)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{rate_text(speed, self.unit):>14}" if speed else f"   ... {self.unit}/s",
                    style="progress.data.speed")


def enable(flag: bool) -> None:
    global _enabled
    _enabled = flag


@contextmanager
def disabled() -> Iterator[None]:
    """No bars inside (timed work must not draw)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


@contextmanager
def bar(description: str, total: int | None, unit: str = "images") -> Iterator["Bar"]:
    """A progress bar on stderr when it is a terminal or ATR_PROGRESS=1; otherwise a no-op."""
    global _active
    import os

    show = _enabled and (sys.stderr.isatty() or os.environ.get("ATR_PROGRESS") == "1")
    if not show or _active is not None:
        yield Bar(None, None)
        return
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TaskProgressColumn(), RateColumn(unit), TimeElapsedColumn(), TimeRemainingColumn(),
                        transient=False)
    _active = progress
    with progress:
        task = progress.add_task(description, total=total)
        global _bar
        _bar = Bar(progress, task)
        try:
            yield _bar
        finally:
            _active, _bar = None, None


@contextmanager
def phases(unit: str = "steps") -> Iterator:
    """A callback ``(phase, step, total, metrics)`` drawing one bar per phase (data, tower, lm,
    eval); the bar's description shows the latest metrics. A no-op without a terminal."""
    import os

    show = _enabled and (sys.stderr.isatty() or os.environ.get("ATR_PROGRESS") == "1") and _active is None
    if not show:
        yield lambda *a: None
        return
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
    tasks: dict[str, object] = {}

    def update(phase: str, step: int, total: int, metrics: dict) -> None:
        if phase not in tasks:
            tasks[phase] = progress.add_task(phase, total=total)
        text = phase + "".join(f" {k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        progress.update(tasks[phase], completed=step, total=total, description=text)

    with progress:
        yield update


def set_description(text: str) -> None:
    """Replace the description of the bar this process has open, if any (e.g. the loss)."""
    if _bar is not None and _bar.progress is not None:
        _bar.progress.update(_bar.task, description=text)


def advance(n: int = 1) -> None:
    """Advance the bar this process has open, if any."""
    if _bar is not None:
        _bar.advance(n)


class Bar:
    def __init__(self, progress: Progress | None, task):
        self.progress, self.task = progress, task

    def advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

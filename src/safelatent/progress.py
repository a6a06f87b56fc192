"""One progress-bar style for long work (sampling, training), drawn on stderr so stdout stays clean."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``2.31 img/s`` (blank until rich has a speed estimate)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text("" if task.speed is None else f"{task.speed:.2f} {self.unit}/s")


def progress_bar(*, transient: bool = False, rate_unit: str | None = None, disable: bool = False) -> Progress:
    """A rich ``Progress`` (description, bar, n/total, [rate,] time left) on stderr; use as a context
    manager. ``rate_unit`` adds an items-per-second column (``"img"`` → ``2.31 img/s``)."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if rate_unit:
        columns.append(RateColumn(rate_unit))
    columns.append(TimeRemainingColumn())
    return Progress(*columns, console=Console(stderr=True), transient=transient, disable=disable)

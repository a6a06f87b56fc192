"""One progress-bar style for long work (sampling, training), drawn on stderr so stdout stays clean."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def progress_bar(*, transient: bool = False) -> Progress:
    """A rich ``Progress`` (description, bar, n/total, time left) on stderr; use as a context manager."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=transient,
    )

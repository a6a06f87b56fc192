"""What every ``safelatent`` command shares: the stderr console and the user-error wrapper.

A :class:`~safelatent.errors.SafelatentError` becomes one red line on stderr (``error: what — hint``) and
exit status 2, never a traceback (``SAFELATENT_DEBUG=1`` re-raises it).
"""

from __future__ import annotations

import functools
import os

import typer
from rich.console import Console

from .errors import SafelatentError

err = Console(stderr=True)


def user_errors(command):
    """Turn :class:`SafelatentError` into one red line and exit status 2 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SafelatentError as error:
            if os.environ.get("SAFELATENT_DEBUG"):
                raise
            err.print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper

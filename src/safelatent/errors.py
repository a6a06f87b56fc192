"""One exception hierarchy for everything a user can get wrong.

Every error carries two parts: ``what`` went wrong and ``hint`` — what to do about it. The CLI prints
``str(error)`` (one line, no traceback) for any :class:`SafelatentError`; library users can catch the
base class or a specific subclass.
"""

from __future__ import annotations


class SafelatentError(Exception):
    """Base class: a user-facing error with a message and a hint on how to fix it."""

    def __init__(self, what: str, hint: str | None = None) -> None:
        self.what = what
        self.hint = hint
        super().__init__(what if not hint else f"{what} — {hint}")


class ModelNotFoundError(SafelatentError):
    """The model path does not exist (or is a hub id, which is never resolved)."""


class ModelFormatError(SafelatentError):
    """The path exists but is not a model we can load: a folder missing a component, a file whose
    keys fit no known architecture, an unsupported extension."""


class UnsafeCheckpointError(SafelatentError):
    """A pickle-based checkpoint that would need full unpickling (arbitrary code execution) to load."""


class InvalidWeightsError(SafelatentError):
    """Weights that load but cannot be used: NaN/inf values, wrong shapes."""


class InvalidArgumentError(SafelatentError):
    """A generation or CLI argument out of range: sizes not a multiple of 8, unknown scheduler, ..."""


class OfflineViolationError(SafelatentError):
    """Some code path tried to reach the network. safelatent never contacts a model hub."""

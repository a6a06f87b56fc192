"""Offline enforcement for everything that loads models: no hub id is ever resolved, no request is sent.

Implements the "offline by construction" principle of ``DESIGN.md``. The loaders only ever pass local
paths with ``local_files_only=True``; :func:`offline_mode` is the second, independent layer that makes a
hub request impossible even if some library code path decided to try one (diffusers' ``from_single_file``
is known to retry online when it cannot find configs).

What the libraries installed here actually read (checked in huggingface_hub 2.4, transformers 5.23,
diffusers 0.42):

* ``huggingface_hub.constants.HF_HUB_OFFLINE`` is computed **once, at import**, from the environment
  variables ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``. ``huggingface_hub.is_offline_mode()`` returns
  that constant, and the hub's HTTP client refuses every request (``OfflineModeIsEnabled``) while it is
  true. transformers 5 calls ``huggingface_hub.is_offline_mode()`` at call time, so patching the constant
  covers it.
* diffusers copies the constant by value at import (``from huggingface_hub.constants import
  HF_HUB_OFFLINE`` in ``diffusers.utils.hub_utils``, ``diffusers.loaders.lora_base``,
  ``diffusers.models.attention_dispatch``), so those module-level copies are patched too — generically:
  every already-imported ``huggingface_hub``/``transformers``/``diffusers`` module with a ``bool``
  attribute ``HF_HUB_OFFLINE``.
* The environment variables (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``HF_DATASETS_OFFLINE``, and
  ``HF_HUB_DISABLE_TELEMETRY``) are set as well, for modules imported while the context is active and for
  subprocesses. diffusers has no offline variable of its own; it follows ``HF_HUB_OFFLINE``.

Everything is restored on exit. Nested and concurrent (multi-threaded) use is reference-counted: the
first entry patches, the last exit restores.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["OFFLINE_ENV", "is_offline_enforced", "offline_mode"]

#: Environment variables set (to these values) while :func:`offline_mode` is active.
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}

_PATCHED_PACKAGES = ("huggingface_hub", "transformers", "diffusers")

_lock = threading.RLock()
_depth = 0
_saved_env: dict[str, str | None] = {}
_saved_hub_constant: bool | None = None
_saved_module_flags: dict[str, bool] = {}


def _modules_with_offline_flag() -> Iterator[tuple[str, object]]:
    """Yield ``(name, module)`` for loaded hub/transformers/diffusers modules holding an offline copy."""
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(_PATCHED_PACKAGES):
            continue
        try:
            value = module.__dict__.get("HF_HUB_OFFLINE")
        except AttributeError:  # pragma: no cover - exotic module objects
            continue
        if isinstance(value, bool):
            yield name, module


def _enter() -> None:
    global _saved_hub_constant
    _saved_env.clear()
    for key, value in OFFLINE_ENV.items():
        _saved_env[key] = os.environ.get(key)
        os.environ[key] = value

    import huggingface_hub.constants as hub_constants

    _saved_hub_constant = hub_constants.HF_HUB_OFFLINE
    _saved_module_flags.clear()
    for name, module in _modules_with_offline_flag():
        _saved_module_flags[name] = module.HF_HUB_OFFLINE
        module.HF_HUB_OFFLINE = True
    hub_constants.HF_HUB_OFFLINE = True


def _exit() -> None:
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env.clear()

    import huggingface_hub.constants as hub_constants

    original = bool(_saved_hub_constant)
    for name, module in _modules_with_offline_flag():
        # Modules imported while offline copied ``True``: give them the value they would have had.
        module.HF_HUB_OFFLINE = _saved_module_flags.get(name, original)
    hub_constants.HF_HUB_OFFLINE = original
    _saved_module_flags.clear()


@contextmanager
def offline_mode() -> Iterator[None]:
    """Make every Hugging Face Hub request fail fast for the duration of the ``with`` block.

    Sets :data:`OFFLINE_ENV` and patches ``huggingface_hub.constants.HF_HUB_OFFLINE`` (plus the copies
    diffusers keeps of it) to ``True``; restores the previous values afterwards. Inside the block, any hub
    call raises ``huggingface_hub.errors.OfflineModeIsEnabled`` before a socket is opened; the model loader
    turns that into :class:`~safelatent.errors.OfflineViolationError`.
    """
    global _depth
    with _lock:
        if _depth == 0:
            _enter()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _exit()


def is_offline_enforced() -> bool:
    """Whether an :func:`offline_mode` block is active right now (in any thread)."""
    return _depth > 0

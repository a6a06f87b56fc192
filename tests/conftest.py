"""Shared pytest fixtures.

``block_network``: every attempt to open a network connection or resolve a host name fails with
``OSError`` and is recorded; the fixture's value is the list of attempts, so a test can assert that none
happened (a library that swallows the error and falls back would otherwise go unnoticed). Unix-domain
sockets stay allowed (local IPC, not network).
"""

from __future__ import annotations

import socket

import pytest


@pytest.fixture
def block_network(monkeypatch):
    attempts: list[str] = []

    def refuse(what: str):
        def blocked(*args, **kwargs):
            attempts.append(f"{what}{args[1:] if what.startswith('socket.') else args}")
            raise OSError(f"network access blocked in tests: {what}")

        return blocked

    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def connect(self, address):
        if self.family == getattr(socket, "AF_UNIX", None):
            return real_connect(self, address)
        return refuse("socket.connect")(self, address)

    def connect_ex(self, address):
        if self.family == getattr(socket, "AF_UNIX", None):
            return real_connect_ex(self, address)
        return refuse("socket.connect_ex")(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    return attempts


@pytest.fixture(autouse=True, scope="session")
def isolated_safelatent_state(tmp_path_factory):
    """Every generation writes an audit row and may look for C2PA keys, the service for API keys: point
    them at a session folder (subprocesses inherit the variables), never at the user's ``~/.local/share``
    or ``~/.config``."""
    root = tmp_path_factory.mktemp("safelatent-state")
    patch = pytest.MonkeyPatch()
    patch.setenv("SAFELATENT_AUDIT_DB", str(root / "audit.sqlite3"))
    patch.setenv("SAFELATENT_KEYS_DIR", str(root / "no-keys"))
    patch.setenv("SAFELATENT_API_KEYS", str(root / "api-keys.sqlite3"))
    yield root
    patch.undo()


@pytest.fixture(scope="session")
def toy_theme_adapter(tmp_path_factory):
    """The toy world's theme adapter (``safelatent.train.toy_theme``: striped images + regularisation
    images, UNet + text-encoder LoRA), trained once per session: its behaviour test and the erasure
    adapter's stacking test both use it. Returns ``(summary, seconds)``; ``summary["components"]`` is the
    toy model with the adapter attached, ``summary["lora_file"]`` the file."""
    import time

    import torch

    from safelatent.train.lora import train_lora
    from safelatent.train.toy_theme import theme_config, write_theme_folder

    tmp = tmp_path_factory.mktemp("toy-lora")
    write_theme_folder(tmp / "data", 200, seed=2024)
    torch.set_num_threads(2)
    started = time.perf_counter()
    summary = train_lora(theme_config(tmp / "data", tmp / "out"), keep_components=True)
    return summary, time.perf_counter() - started


@pytest.fixture(scope="session")
def toy_erasure_adapter(tmp_path_factory):
    """The toy world's erasure adapter for the marker's concept (``safelatent.train.toy_erase``: ESD-kv
    anchored to the toy captions, no image data; the bench's recipe, ~80 s on 2 cores), trained once per
    session. Returns the training summary."""
    import torch

    from safelatent.train.erase import train_erase
    from safelatent.train.toy_erase import erase_config

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("toy-erase") / "out"
    return train_erase(erase_config(out, seed=1))

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
    """Every generation writes an audit row and may look for C2PA keys: point both at a session folder
    (subprocesses inherit the variables), never at the user's ``~/.local/share`` or ``~/.config``."""
    root = tmp_path_factory.mktemp("safelatent-state")
    patch = pytest.MonkeyPatch()
    patch.setenv("SAFELATENT_AUDIT_DB", str(root / "audit.sqlite3"))
    patch.setenv("SAFELATENT_KEYS_DIR", str(root / "no-keys"))
    yield root
    patch.undo()

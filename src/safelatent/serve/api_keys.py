"""API keys of ``safelatent serve``: created by the operator, stored hashed, each with its own limits.

A key is ``sl_`` + 32 random bytes (URL-safe base64, 256 bits from :mod:`secrets`). Only its SHA-256 is
stored: with 256 bits of entropy a fast hash is as safe as a slow one (nothing to brute-force), and it
lets every request be checked with one indexed lookup. The key itself is shown once, by
``safelatent keys add``, and never again.

The store is one SQLite file (default ``$SAFELATENT_API_KEYS`` or
``~/.local/share/safelatent/api-keys.sqlite3``): table ``keys`` (name, hash, limits, revoked) and table
``usage`` (images generated per key and UTC day, for the daily quota). The server re-reads a key on
each request, so ``keys revoke`` takes effect at once.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..errors import InvalidArgumentError

__all__ = ["ApiKey", "ApiKeyStore", "default_keys_db", "hash_key"]

KEY_PREFIX = "sl_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id INTEGER PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    hash TEXT UNIQUE NOT NULL,
    created TEXT NOT NULL,
    requests_per_minute REAL NOT NULL,
    images_per_day INTEGER NOT NULL,
    revoked TEXT
);
CREATE TABLE IF NOT EXISTS usage (
    key_id INTEGER NOT NULL REFERENCES keys(id),
    day TEXT NOT NULL,
    images INTEGER NOT NULL,
    PRIMARY KEY (key_id, day)
);
"""


def default_keys_db() -> Path:
    """``$SAFELATENT_API_KEYS``, else ``~/.local/share/safelatent/api-keys.sqlite3``."""
    configured = os.environ.get("SAFELATENT_API_KEYS")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".local" / "share" / "safelatent" / "api-keys.sqlite3"


def hash_key(key: str) -> str:
    """The stored form of a key: SHA-256 hex of its UTF-8 bytes."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _today() -> str:
    return datetime.now(UTC).date().isoformat()


@dataclass(frozen=True)
class ApiKey:
    """A key's record (never the key itself)."""

    id: int
    name: str
    created: str
    requests_per_minute: float
    images_per_day: int
    revoked: str | None = None


class ApiKeyStore:
    """The key file; safe to share between threads (one connection, one lock)."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else default_keys_db()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        if new:
            os.chmod(self.path, 0o600)  # hashes only, but nobody else needs to read them

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- the operator's side (safelatent keys …) -------------------------------------------------------

    def add(self, name: str, *, requests_per_minute: float = 30.0, images_per_day: int = 1000) -> str:
        """Create a key called ``name``; returns the key (shown once: only its hash is stored)."""
        if not _NAME.match(name or ""):
            raise InvalidArgumentError(
                f"key name {name!r} is not 1-64 letters, digits, '.', '_' or '-'", "e.g. 'studio-a'"
            )
        if not (requests_per_minute > 0 and requests_per_minute <= 10_000):
            raise InvalidArgumentError(
                f"requests per minute must be in (0, 10000], got {requests_per_minute}", "e.g. 30"
            )
        if not 1 <= images_per_day <= 10_000_000:
            raise InvalidArgumentError(
                f"images per day must be 1-10000000, got {images_per_day}", "e.g. 1000"
            )
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        created = datetime.now(UTC).isoformat(timespec="seconds")
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO keys (name, hash, created, requests_per_minute, images_per_day) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (name, hash_key(key), created, float(requests_per_minute), int(images_per_day)),
                )
            except sqlite3.IntegrityError:
                raise InvalidArgumentError(
                    f"a key called {name!r} exists already in {self.path}",
                    "choose another name, or revoke the old key first",
                ) from None
        return key

    def revoke(self, name: str) -> None:
        with self._lock:
            cursor = self._db.execute(
                "UPDATE keys SET revoked = ? WHERE name = ? AND revoked IS NULL",
                (datetime.now(UTC).isoformat(timespec="seconds"), name),
            )
        if cursor.rowcount == 0:
            raise InvalidArgumentError(
                f"no active key called {name!r} in {self.path}", "list them with: safelatent keys list"
            )

    def list(self) -> list[tuple[ApiKey, int]]:
        """Every key with the images it generated today (UTC)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT k.id, k.name, k.created, k.requests_per_minute, k.images_per_day, k.revoked, "
                "COALESCE(u.images, 0) FROM keys k LEFT JOIN usage u ON u.key_id = k.id AND u.day = ? "
                "ORDER BY k.id",
                (_today(),),
            ).fetchall()
        return [(ApiKey(*row[:6]), row[6]) for row in rows]

    @property
    def empty(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM keys WHERE revoked IS NULL").fetchone()[0] == 0

    # ---- the server's side ---------------------------------------------------------------------------

    def authenticate(self, key: str | None) -> ApiKey | None:
        """The active key record for ``key``, else ``None`` (unknown, revoked, malformed)."""
        if not key or not key.startswith(KEY_PREFIX) or len(key) > 200:
            return None
        digest = hash_key(key)
        with self._lock:
            row = self._db.execute(
                "SELECT id, name, created, requests_per_minute, images_per_day, revoked, hash FROM keys "
                "WHERE hash = ?",
                (digest,),
            ).fetchone()
        if row is None or row[5] is not None or not hmac.compare_digest(row[6], digest):
            return None
        return ApiKey(*row[:6])

    def reserve_images(self, key: ApiKey, count: int) -> str | None:
        """Count ``count`` images against today's quota; returns the day charged, ``None`` (nothing
        counted) when they don't fit."""
        day = _today()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT images FROM usage WHERE key_id = ? AND day = ?", (key.id, day)
                ).fetchone()
                used = row[0] if row else 0
                if used + count > key.images_per_day:
                    self._db.execute("ROLLBACK")
                    return None
                self._db.execute(
                    "INSERT INTO usage (key_id, day, images) VALUES (?, ?, ?) "
                    "ON CONFLICT (key_id, day) DO UPDATE SET images = images + excluded.images",
                    (key.id, day, count),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return day

    def release_images(self, key: ApiKey, count: int, day: str) -> None:
        """Give back images reserved (on ``day``) for a request that produced nothing (refused, failed)."""
        with self._lock:
            self._db.execute(
                "UPDATE usage SET images = MAX(0, images - ?) WHERE key_id = ? AND day = ?",
                (count, key.id, day),
            )

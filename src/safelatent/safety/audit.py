"""Layer 5: an append-only audit log of every generation request, in SQLite.

One row per request in the ``audit_requests`` table:

============== ==========================================================================================
column         content
============== ==========================================================================================
id             row id (``INTEGER PRIMARY KEY``), increasing in write order
time           UTC, ISO 8601 with microseconds (``2026-11-23T11:08:20.123456+00:00``)
request_id     the caller's request id (a random hex id if none is given)
prompt         the prompt, or NULL when the policy says ``store_prompt = false``
prompt_sha256  SHA-256 (hex) of the prompt — always stored
normalized     the normalised prompt (same rule as ``prompt``)
normalized_sha256  SHA-256 of the normalised prompt
settings       JSON: the generation settings (with ``store_prompt = false``, prompt texts in them are
               replaced by ``"sha256:<hex>"``)
model_hash     the model's hash
adapters       JSON list: one object per active adapter (name, hash, weight)
layers         JSON object: per-layer decisions and scores — ``prompt_policy`` (decision, scores, reasons),
               ``sld`` (on/off, preset, concept), ``classifiers`` (scores, actions, reasons), and
               ``provenance`` when given (watermark ids)
outcome        one of :data:`OUTCOMES` (``generated``, ``blocked``, ``partially-withheld``, ...)
reasons        JSON list of one-line reasons (what the table view shows)
images         JSON list, one object per output image: ``index``, ``phash`` (imagehash pHash, 64-bit hex),
               ``withheld``, ``action`` (the output classifiers' keep / blur / withhold) and ``reasons``.
               Never pixels; the pHash is the only image-derived value kept, for withheld images too (it
               is a 64-bit fingerprint, not a picture). Images, arrays and bytes met anywhere in the
               settings or layers are replaced by ``"<omitted: pixels>"``.
prev_hash      ``row_hash`` of the previous row (64 zeros for the first)
row_hash       SHA-256 of the canonical JSON of this row's stored columns (all but ``id`` and
               ``row_hash``) followed by ``prev_hash``: a hash chain, checked by :meth:`AuditLog.verify_chain`
============== ==========================================================================================

Images live in a JSON column rather than a child table so that one row is one request and the hash chain
covers everything recorded about it.

Append-only is enforced by the database: triggers abort every ``UPDATE`` and ``DELETE`` on
``audit_requests``. That stops accidents and casual edits, not someone with write access to the file (who
can drop the triggers); the hash chain makes such edits *evident* — :meth:`AuditLog.verify_chain` reports
the first row whose content or link no longer matches. Cutting rows off the end leaves a valid, shorter
chain; keep a copy of the latest ``row_hash`` elsewhere to detect that.

Concurrency: the file is in WAL mode; writers in one process share a lock per :class:`AuditLog`, writers
in several processes wait on SQLite's busy timeout, and each append reads the previous hash and inserts
inside one ``BEGIN IMMEDIATE`` transaction, so the chain stays linear.

The default database is ``$SAFELATENT_AUDIT_DB``, else ``$XDG_DATA_HOME/safelatent/audit.sqlite3``
(``~/.local/share/safelatent/audit.sqlite3``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError, SafelatentError

#: the schema this module writes; a database with a higher version was written by a newer safelatent
SCHEMA_VERSION = 1
#: the outcomes a request can have
OUTCOMES = ("generated", "partially-withheld", "withheld", "blocked", "error")
#: ``prev_hash`` of the first row
GENESIS_HASH = "0" * 64
#: what stands in the log where a value held pixels (images, arrays, bytes)
OMITTED = "<omitted: pixels>"
#: seconds a writer waits for another process's write lock before giving up
BUSY_TIMEOUT_S = 30.0

_COLUMNS = (
    "time",
    "request_id",
    "prompt",
    "prompt_sha256",
    "normalized",
    "normalized_sha256",
    "settings",
    "model_hash",
    "adapters",
    "layers",
    "outcome",
    "reasons",
    "images",
    "prev_hash",
)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS audit_requests (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    request_id TEXT NOT NULL,
    prompt TEXT,
    prompt_sha256 TEXT NOT NULL,
    normalized TEXT,
    normalized_sha256 TEXT,
    settings TEXT NOT NULL,
    model_hash TEXT,
    adapters TEXT NOT NULL,
    layers TEXT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ({", ".join(repr(o) for o in OUTCOMES)})),
    reasons TEXT NOT NULL,
    images TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    row_hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_requests_time ON audit_requests (time);
CREATE INDEX IF NOT EXISTS audit_requests_request_id ON audit_requests (request_id);
CREATE TRIGGER IF NOT EXISTS audit_requests_no_update BEFORE UPDATE ON audit_requests
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only: rows cannot be updated');
END;
CREATE TRIGGER IF NOT EXISTS audit_requests_no_delete BEFORE DELETE ON audit_requests
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only: rows cannot be deleted');
END;
"""


class AuditLogError(SafelatentError):
    """The audit log cannot be opened, read or written: a missing file, a file that is not a safelatent
    audit database, one from a newer version, a locked or read-only file."""


def default_audit_db() -> Path:
    """``$SAFELATENT_AUDIT_DB``, else ``$XDG_DATA_HOME/safelatent/audit.sqlite3``
    (``~/.local/share/safelatent/audit.sqlite3``)."""
    env = os.environ.get("SAFELATENT_AUDIT_DB")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "safelatent" / "audit.sqlite3"


def sha256_text(text: str) -> str:
    """SHA-256 (hex) of ``text`` encoded as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, UTF-8 kept: the same value always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def utc_now() -> str:
    """Now, UTC, in the log's time format."""
    return format_time(datetime.now(UTC))


def format_time(moment: datetime) -> str:
    """``moment`` as the log stores it: UTC, ISO 8601 with microseconds (naive times are taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def parse_time(value: str | datetime, what: str = "time") -> str:
    """An ISO 8601 date or time (``2026-11-23``, ``2026-11-23T11:00``, ``...Z``, ``...+01:00``; no zone =
    UTC) in the log's format, for range queries."""
    if isinstance(value, datetime):
        return format_time(value)
    text = str(value).strip()
    try:
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise InvalidArgumentError(
            f"{what} {value!r} is not an ISO 8601 date or time",
            "e.g. 2026-11-23, 2026-11-23T09:30 or 2026-11-23T09:30:00+01:00 (no zone means UTC)",
        ) from None
    return format_time(moment)


def image_phash(image: Any) -> str:
    """The perceptual hash (imagehash pHash, 8×8 = 64 bits) of a PIL image, as 16 hex digits."""
    try:
        import imagehash
    except ImportError:  # pragma: no cover - a declared dependency
        raise AuditLogError(
            "the audit log needs the imagehash package for perceptual hashes", "pip install imagehash"
        ) from None
    return str(imagehash.phash(image))


def phash_distance(a: str, b: str) -> int:
    """Hamming distance between two hex pHashes (0 = same fingerprint; ≤ 8 of 64 bits ≈ same picture)."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _is_pixels(value: Any) -> bool:
    """PIL images, numpy arrays and tensors with more than one element, raw bytes: never stored."""
    if isinstance(value, bytes | bytearray | memoryview):
        return True
    if hasattr(value, "getpixel") and hasattr(value, "mode") and hasattr(value, "size"):
        return True
    size = getattr(value, "size", None)
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        count = size() if callable(size) else size
        return count is None or int(count) != 1
    return False


def _jsonable(value: Any) -> Any:
    """Turn decisions, reports, dataclasses, tuples, paths and numpy scalars into plain JSON values.

    Pixel data never gets through: PIL images, arrays/tensors of more than one element and raw bytes become
    the string ``"<omitted: pixels>"`` (a classifier ``Decision`` carries its image, for example).
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if _is_pixels(value):
        return OMITTED
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    for method in ("as_dict", "to_dict"):
        if callable(getattr(value, method, None)):
            return _jsonable(getattr(value, method)())
    if is_dataclass(value) and not isinstance(value, type):
        # field by field, not dataclasses.asdict: that would deep-copy any image inside first
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return str(value)


_PROMPT_KEYS = frozenset(
    {"prompt", "prompts", "negative_prompt", "negative_prompts", "normalized_text", "normalized", "original"}
)


def _redact(value: Any, secrets_: frozenset[str], key: str | None = None) -> Any:
    """Replace prompt texts (values under prompt-ish keys, and any string equal to one of ``secrets_``) by
    ``"sha256:<hex>"``."""
    if isinstance(value, dict):
        return {k: _redact(v, secrets_, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, secrets_, key) for v in value]
    if isinstance(value, str) and (key in _PROMPT_KEYS or value in secrets_):
        return f"sha256:{sha256_text(value)}"
    return value


@dataclass(frozen=True)
class AuditImage:
    """What the log keeps of one output image: its pHash, whether (and why) it was withheld, and the output
    classifiers' ``action`` for it (``keep`` / ``blur`` / ``withhold``, if they ran)."""

    phash: str
    withheld: bool = False
    reasons: tuple[str, ...] = ()
    action: str | None = None

    @classmethod
    def from_image(
        cls,
        image: Any,
        *,
        withheld: bool | None = None,
        reasons: Iterable[str] = (),
        action: str | None = None,
    ) -> AuditImage:
        """Fingerprint a PIL image (the pixels themselves are not kept). ``withheld`` defaults to
        ``action == "withhold"``."""
        if withheld is None:
            withheld = action == "withhold"
        return cls(
            phash=image_phash(image), withheld=withheld, reasons=tuple(str(r) for r in reasons), action=action
        )


def derive_outcome(blocked: bool, images: Sequence[AuditImage]) -> str:
    """``blocked`` if the prompt was blocked; else ``withheld`` if every image was withheld,
    ``partially-withheld`` if some were, ``generated`` otherwise."""
    if blocked:
        return "blocked"
    withheld = sum(1 for image in images if image.withheld)
    if images and withheld == len(images):
        return "withheld"
    return "partially-withheld" if withheld else "generated"


@dataclass
class AuditEntry:
    """One request, as the caller hands it to :meth:`AuditLog.record`.

    ``prompt_policy``, ``sld`` and ``classifiers`` are the per-layer decisions: dicts, or objects with
    ``as_dict()``/``to_dict()`` (e.g. a ``PolicyDecision``) — they are stored under ``layers``.
    ``store_prompt=False`` (the policy's ``store_prompt = false``) keeps only SHA-256 hashes of the prompt,
    the normalised prompt and any prompt text inside ``settings`` and ``layers``. ``outcome`` defaults to
    :func:`derive_outcome`; ``reasons`` to the prompt policy's message plus the withheld images' reasons.
    """

    prompt: str
    request_id: str | None = None
    normalized_prompt: str | None = None
    store_prompt: bool = True
    settings: Mapping[str, Any] | Any = field(default_factory=dict)
    model_hash: str | None = None
    adapters: Sequence[Mapping[str, Any]] = ()
    prompt_policy: Any = None
    sld: Mapping[str, Any] | None = None
    classifiers: Any = None
    #: layer 4: e.g. ``{"watermark": [{"embedded": True, "content_id": "3fa2c1", ...}, ...]}``
    provenance: Any = None
    images: Sequence[AuditImage] = ()
    outcome: str | None = None
    reasons: Sequence[str] | None = None
    #: when the request was made (default: when it is recorded)
    time: datetime | str | None = None

    @classmethod
    def from_generation(
        cls,
        result: Any,
        *,
        request_id: str | None = None,
        prompt_policy: Any = None,
        decisions: Sequence[Any] | None = None,
        classifiers: Any = None,
        withheld: Mapping[int, Sequence[str]] | None = None,
        store_prompt: bool = True,
        normalized_prompt: str | None = None,
        outcome: str | None = None,
    ) -> AuditEntry:
        """Build an entry from a :class:`safelatent.api.GenerationResult`: its settings, model and adapter
        hashes, SLD settings, and one pHash per generated image (before any blur).

        ``decisions``: the output classifiers' per-image decisions (objects with ``index``, ``action``,
        ``reasons`` and ``triggers``, as from ``classifiers.apply_actions``) — they set each image's action
        and reasons and, unless ``classifiers`` is given, fill the ``classifiers`` layer (without the
        images). ``withheld``: image index → reasons, for callers without decision objects. The prompt
        is the first of the result's prompts (the settings keep them all).
        """
        settings = result.settings
        actions: dict[int, tuple[str | None, tuple[str, ...]]] = {
            index: ("withhold", tuple(reasons)) for index, reasons in (withheld or {}).items()
        }
        for decision in decisions or ():
            actions[int(decision.index)] = (decision.action, tuple(str(r) for r in decision.reasons))
        if decisions is not None and classifiers is None:
            classifiers = [
                {
                    "index": d.index,
                    "action": d.action,
                    "reasons": [str(r) for r in d.reasons],
                    "triggers": _jsonable(getattr(d, "triggers", ())),
                }
                for d in decisions
            ]
        images = []
        for index, image in enumerate(result.images):
            action, reasons = actions.get(index, (None, ()))
            shown = reasons if action not in (None, "keep") else ()
            images.append(AuditImage.from_image(image, action=action, reasons=shown))
        sld = dict(settings.sld) if settings.sld else None
        if normalized_prompt is None and prompt_policy is not None:
            normalized_prompt = getattr(prompt_policy, "normalized_text", None)
        return cls(
            prompt=settings.prompts[0],
            request_id=request_id,
            normalized_prompt=normalized_prompt,
            store_prompt=store_prompt,
            settings=settings.as_dict(),
            model_hash=settings.model_hash,
            adapters=[
                {k: lora.get(k) for k in ("name", "hash", "weight", "format")} for lora in settings.loras
            ],
            prompt_policy=prompt_policy,
            sld={"enabled": sld is not None, **(sld or {})},
            classifiers=classifiers,
            images=images,
            outcome=outcome,
        )

    def to_row(self) -> dict[str, Any]:
        """The stored columns (all but ``id``, ``prev_hash`` and ``row_hash``), JSON columns as text."""
        outcome = self.outcome or derive_outcome(self._policy_blocked(), self.images)
        if outcome not in OUTCOMES:
            raise InvalidArgumentError(
                f"unknown audit outcome {outcome!r}", f"use one of: {', '.join(OUTCOMES)}"
            )
        if not isinstance(self.prompt, str):
            raise InvalidArgumentError("the audit entry's prompt must be a string")
        layers = {
            "prompt_policy": _jsonable(self.prompt_policy),
            "sld": _jsonable(self.sld),
            "classifiers": _jsonable(self.classifiers),
        }
        if self.provenance is not None:
            layers["provenance"] = _jsonable(self.provenance)
        settings = _jsonable(self.settings)
        reasons = [str(r) for r in self.reasons] if self.reasons is not None else self._default_reasons()
        images = [
            {
                "index": i,
                "phash": str(im.phash),
                "withheld": bool(im.withheld),
                "action": im.action,
                "reasons": [str(r) for r in im.reasons],
            }
            for i, im in enumerate(self.images)
        ]
        normalized = self.normalized_prompt
        if not self.store_prompt:
            hidden = frozenset(t for t in (self.prompt, normalized) if t)
            settings = _redact(settings, hidden)
            layers = _redact(layers, hidden)
            reasons = _redact(reasons, hidden)
        when = self.time
        return {
            "time": utc_now() if when is None else parse_time(when),
            "request_id": self.request_id or secrets.token_hex(16),
            "prompt": self.prompt if self.store_prompt else None,
            "prompt_sha256": sha256_text(self.prompt),
            "normalized": normalized if self.store_prompt else None,
            "normalized_sha256": None if normalized is None else sha256_text(normalized),
            "settings": canonical_json(settings),
            "model_hash": self.model_hash,
            "adapters": canonical_json(_jsonable(list(self.adapters))),
            "layers": canonical_json(layers),
            "outcome": outcome,
            "reasons": canonical_json(reasons),
            "images": canonical_json(images),
        }

    def _policy_blocked(self) -> bool:
        policy = self.prompt_policy
        if policy is None:
            return False
        action = policy.get("action") if isinstance(policy, Mapping) else getattr(policy, "action", None)
        return action == "block"

    def _default_reasons(self) -> list[str]:
        reasons: list[str] = []
        policy = _jsonable(self.prompt_policy)
        if isinstance(policy, dict):
            if policy.get("message"):
                reasons.append(f"prompt: {policy['message']}")
            elif policy.get("action") in ("block", "suppress"):
                categories = [c for c, a in (policy.get("actions") or {}).items() if a == policy["action"]]
                reasons.append(f"prompt: {policy['action']} {', '.join(categories)}".rstrip())
        for index, image in enumerate(self.images):
            if image.withheld or image.action not in (None, "keep"):
                why = "; ".join(image.reasons) or image.action or "withheld"
                reasons.append(f"image {index}: {why}")
        return reasons


def row_hash(row: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of the row's stored columns (without ``id`` and ``row_hash``),
    followed by its ``prev_hash``."""
    content = {k: row[k] for k in _COLUMNS}
    return hashlib.sha256((canonical_json(content) + row["prev_hash"]).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class AuditRecord:
    """One stored row, JSON columns decoded."""

    id: int
    time: str
    request_id: str
    prompt: str | None
    prompt_sha256: str
    normalized: str | None
    normalized_sha256: str | None
    settings: dict[str, Any]
    model_hash: str | None
    adapters: list[dict[str, Any]]
    layers: dict[str, Any]
    outcome: str
    reasons: list[str]
    images: list[dict[str, Any]]
    prev_hash: str
    row_hash: str

    @property
    def prompt_shown(self) -> str:
        """The prompt, or ``sha256:<hex>`` when only its hash was stored."""
        return self.prompt if self.prompt is not None else f"sha256:{self.prompt_sha256}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> AuditRecord:
        values = dict(row)
        for key in ("settings", "adapters", "layers", "reasons", "images"):
            values[key] = json.loads(values[key])
        return cls(**values)


@dataclass(frozen=True)
class ChainReport:
    """What :meth:`AuditLog.verify_chain` found: ``ok``, the rows checked and, if broken, the id of the
    first bad row and why."""

    ok: bool
    rows: int
    first_broken: int | None = None
    reason: str = ""
    last_hash: str = GENESIS_HASH

    def summary(self) -> str:
        if self.ok:
            return f"hash chain intact: {self.rows} row(s), last hash {self.last_hash}"
        return f"hash chain broken at row {self.first_broken}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AuditLog:
    """An append-only SQLite audit log (see the module docs for the schema).

    ``AuditLog(path)`` creates the file (and its folder) if needed; ``create=False`` instead raises
    :class:`AuditLogError` for a missing file (what the ``audit`` command uses). ``path=None`` opens
    :func:`default_audit_db`. Safe to share between threads; several processes may write the same file.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, create: bool = True) -> None:
        self.path = Path(path).expanduser() if path is not None else default_audit_db()
        self._lock = threading.Lock()
        if self.path.is_dir():
            raise AuditLogError(f"{self.path} is a folder, not an audit database", "pass a file path")
        if not self.path.exists():
            if not create:
                raise AuditLogError(
                    f"no audit log at {self.path}",
                    "check the path, pass --db PATH or set $SAFELATENT_AUDIT_DB",
                )
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise AuditLogError(f"cannot create {self.path.parent}: {error.strerror or error}") from None
        try:
            self._conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as error:
            raise AuditLogError(f"cannot open the audit log {self.path}: {error}") from None
        self._conn.row_factory = sqlite3.Row
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self._setup(create)
        except sqlite3.DatabaseError as error:
            self._conn.close()
            if "not a database" in str(error) or "malformed" in str(error):
                raise AuditLogError(
                    f"{self.path} is not an SQLite database ({error})",
                    "point --db / $SAFELATENT_AUDIT_DB at a safelatent audit log",
                ) from None
            raise AuditLogError(f"cannot open the audit log {self.path}: {error}") from None
        except AuditLogError:
            self._conn.close()
            raise

    def _setup(self, create: bool) -> None:
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "audit_requests" not in tables:
            if tables or not create:
                raise AuditLogError(
                    f"{self.path} is an SQLite database but not a safelatent audit log",
                    "pass the audit log's path (default: $SAFELATENT_AUDIT_DB or"
                    " ~/.local/share/safelatent/audit.sqlite3)",
                )
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _split_sql(_SCHEMA):
                    self._conn.execute(statement)
                if self._conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
                    self._conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        elif "schema_version" not in tables:
            raise AuditLogError(
                f"{self.path} has no schema_version table", "it was not written by safelatent"
            )
        version = self._conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        if version is None:
            raise AuditLogError(f"{self.path} has no schema version", "it was not written by safelatent")
        if version > SCHEMA_VERSION:
            raise AuditLogError(
                f"{self.path} uses audit schema version {version}; this safelatent reads up to"
                f" {SCHEMA_VERSION}",
                "upgrade safelatent",
            )

    # -- writing -----------------------------------------------------------------------------------

    def record(self, entry: AuditEntry | Mapping[str, Any]) -> int:
        """Append one request; returns its row id. ``entry`` may also be a dict of :class:`AuditEntry`
        fields (``images`` as :class:`AuditImage` or dicts with ``phash``, ``withheld``, ``reasons``)."""
        if isinstance(entry, Mapping):
            fields = dict(entry)
            fields["images"] = [
                im if isinstance(im, AuditImage) else AuditImage(**im) for im in fields.get("images", ())
            ]
            entry = AuditEntry(**fields)
        row = entry.to_row()
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as error:
                raise AuditLogError(
                    f"cannot write the audit log {self.path}: {error}",
                    "another process holds it locked, or the file is read-only",
                ) from None
            try:
                last = self._conn.execute(
                    "SELECT row_hash FROM audit_requests ORDER BY id DESC LIMIT 1"
                ).fetchone()
                row["prev_hash"] = last[0] if last else GENESIS_HASH
                row["row_hash"] = row_hash(row)
                names = (*_COLUMNS, "row_hash")
                cursor = self._conn.execute(
                    f"INSERT INTO audit_requests ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                    [row[n] for n in names],
                )
                self._conn.execute("COMMIT")
            except BaseException as error:
                self._conn.execute("ROLLBACK")
                if isinstance(error, sqlite3.Error):
                    raise AuditLogError(f"cannot write the audit log {self.path}: {error}") from None
                raise
            return int(cursor.lastrowid)

    # -- reading -----------------------------------------------------------------------------------

    def query(
        self,
        since: str | datetime | None = None,
        until: str | datetime | None = None,
        outcome: str | None = None,
        contains: str | None = None,
        limit: int | None = 100,
    ) -> list[AuditRecord]:
        """Rows with ``since <= time < until`` (ISO 8601; no zone = UTC), the given ``outcome``, and
        ``contains`` (case-insensitive) in the prompt, normalised prompt, request id, reasons or model
        hash — or, for rows that keep only hashes, whose prompt is exactly ``contains``. Newest first, at
        most ``limit`` (``None``: all)."""
        where: list[str] = []
        params: list[Any] = []
        if since is not None:
            where.append("time >= ?")
            params.append(parse_time(since, "since"))
        if until is not None:
            where.append("time < ?")
            params.append(parse_time(until, "until"))
        if outcome is not None:
            if outcome not in OUTCOMES:
                raise InvalidArgumentError(
                    f"unknown outcome {outcome!r}", f"use one of: {', '.join(OUTCOMES)}"
                )
            where.append("outcome = ?")
            params.append(outcome)
        if contains:
            pattern = "%" + contains.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            columns = ("prompt", "normalized", "request_id", "reasons", "model_hash")
            like = " OR ".join(f"{c} LIKE ? ESCAPE '\\'" for c in columns)
            where.append(f"({like} OR prompt_sha256 = ? OR normalized_sha256 = ?)")
            params.extend([pattern] * len(columns))
            params.extend([sha256_text(contains)] * 2)
        if limit is not None and limit < 0:
            raise InvalidArgumentError(f"limit {limit} is negative", "pass 0 or more")
        sql = "SELECT * FROM audit_requests"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._lock:
            try:
                rows = self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as error:
                raise AuditLogError(f"cannot read the audit log {self.path}: {error}") from None
        return [AuditRecord.from_row(r) for r in rows]

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM audit_requests").fetchone()[0])

    def find_image(self, image_or_phash: Any, max_distance: int = 8) -> list[tuple[AuditRecord, int, int]]:
        """Requests whose outputs look like ``image_or_phash`` (a PIL image or a hex pHash): ``(record,
        image index, Hamming distance)`` with distance ≤ ``max_distance``, closest first."""
        target = image_or_phash if isinstance(image_or_phash, str) else image_phash(image_or_phash)
        found = []
        for record in self.query(limit=None):
            for image in record.images:
                distance = phash_distance(target, image["phash"])
                if distance <= max_distance:
                    found.append((record, image["index"], distance))
        return sorted(found, key=lambda hit: (hit[2], -hit[0].id))

    def verify_chain(self) -> ChainReport:
        """Recompute every row's hash in id order; report the first row whose content was changed or whose
        link to the previous row is broken (an edited, inserted or deleted row)."""
        previous = GENESIS_HASH
        count = 0
        with self._lock:
            try:
                rows = self._conn.execute("SELECT * FROM audit_requests ORDER BY id").fetchall()
            except sqlite3.Error as error:
                raise AuditLogError(f"cannot read the audit log {self.path}: {error}") from None
        for row in rows:
            values = dict(row)
            if values["prev_hash"] != previous:
                return ChainReport(
                    False,
                    count,
                    values["id"],
                    "its prev_hash does not match the previous row (a row was"
                    " deleted, inserted or edited before it)",
                    previous,
                )
            try:
                expected = row_hash(values)
            except (TypeError, ValueError) as error:
                return ChainReport(
                    False, count, values["id"], f"its columns cannot be hashed: {error}", previous
                )
            if values["row_hash"] != expected:
                return ChainReport(
                    False,
                    count,
                    values["id"],
                    "its content does not match its row_hash (the row was edited)",
                    previous,
                )
            previous = values["row_hash"]
            count += 1
        return ChainReport(True, count, None, "", previous)

    def close(self) -> None:
        """Close the connection (the log can be reopened with a new :class:`AuditLog`)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _split_sql(script: str) -> list[str]:
    """Split the schema into statements (trigger bodies contain ``;`` and end with ``END;``)."""
    statements, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        text = "\n".join(current).strip()
        if sqlite3.complete_statement(text):
            statements.append(text)
            current = []
    return statements


__all__ = [
    "OUTCOMES",
    "SCHEMA_VERSION",
    "AuditEntry",
    "AuditImage",
    "AuditLog",
    "AuditLogError",
    "AuditRecord",
    "ChainReport",
    "default_audit_db",
    "derive_outcome",
    "image_phash",
    "phash_distance",
]

"""The result store of an eval run and how a run's work is split between processes.

**One record per image.** A run folder holds ``results.jsonl`` (or, when the work is split, one
``results-<i>-of-<n>.jsonl`` per shard): one JSON object per line, at least ``{"config": str,
"prompt_id": str, "index": int}`` — the *key* — plus any other JSON fields (scores, paths, seed, ...).

**Append-only and crash-safe.** :meth:`ResultStore.append` writes the lines of one call (one prompt's
batch of images: one *work unit*) with a single ``os.write`` on a file opened with ``O_APPEND``, then
``os.fsync``. A process killed mid-write (SIGKILL, OOM killer, power cut) can leave only an incomplete
final append: a last line without its newline or that does not parse, or — a write cut short exactly at
a line end — the first lines of a unit. Every line of an append but the last ends with ``" \n"`` (a space
is JSON whitespace: any JSON-lines reader reads the file as usual), so that case is visible too. The
next :class:`ResultStore` on the file truncates such an end away (with a ``logging`` warning): a unit
is either wholly in the file or not at all, and a resumed run regenerates exactly the missing units
(:func:`pending`). A bad line *before* the end is not a crash but damage, and is an error naming the line.

**One writer per file.** A :class:`ResultStore` holds an exclusive, non-blocking ``flock`` on
``<file>.lock`` while open (the kernel drops it when the process dies, even by SIGKILL); a second
writer fails at once with :class:`StoreLockedError`. Processes that run in parallel each write their
own shard file (:func:`shard_store_path`); :func:`read_all` merges every ``results*.jsonl`` of a run
folder and refuses a key found in two files.

**Work splitting.** :class:`Shard` is 0-based inside (``index`` in ``0..count-1``, like torchrun's
``RANK``); on the command line and in file names it is 1-based: ``--shard 2/3`` (:func:`parse_shard`)
is ``Shard(index=1, count=3)`` and writes ``results-2-of-3.jsonl``. :func:`shard_items` deals items
round-robin by position (item ``k`` goes to shard ``k % count``).

How a run resumes, safely, with any number of shards::

    units = [(config, prompt_id, range(n)) for config in configs for prompt_id in prompt_ids]
    mine = shard_items(units, shard)            # shard the FULL, deterministic list, never the pending one
    done = {record_key(r) for r in read_all(run_dir)}   # keys of every shard file, also old layouts
    with ResultStore(shard_store_path(run_dir, shard)) as store:
        for config, prompt_id, indices in pending(mine, done | store.keys()):
            store.append(generate_and_classify(config, prompt_id, indices))   # one call per unit
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import InvalidArgumentError, SafelatentError

__all__ = [
    "CorruptResultsError",
    "DuplicateResultError",
    "InvalidRecordError",
    "Key",
    "PartialUnitError",
    "ResultStore",
    "ResultStoreError",
    "Shard",
    "StoreLockedError",
    "parse_shard",
    "pending",
    "read_all",
    "record_key",
    "shard_items",
    "shard_store_path",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Key = tuple[str, str, int]
"""``(config, prompt_id, index)`` — what identifies one image's record."""

KEY_FIELDS = ("config", "prompt_id", "index")
RESULTS_NAME = "results.jsonl"
_SHARD_FILE = re.compile(r"^results-(\d+)-of-(\d+)\.jsonl$")
# Every line of one append but its last ends with a space before the newline (JSON whitespace, invisible
# to any JSON reader): a write cut short exactly at a line end then still shows as incomplete.
_CONTINUES = b" "


# --------------------------------------------------------------------------------------------- errors


class ResultStoreError(SafelatentError):
    """Base class of the result store's errors."""


class InvalidRecordError(ResultStoreError, InvalidArgumentError):
    """A record to append lacks a key field, has one of the wrong type, or is not JSON."""


class DuplicateResultError(ResultStoreError, InvalidArgumentError):
    """A key that is already stored (appending it again would regenerate an image), or a key present
    in two result files of one run."""


class StoreLockedError(ResultStoreError, InvalidArgumentError):
    """Another process (or another open :class:`ResultStore`) is writing this result file."""


class PartialUnitError(ResultStoreError, InvalidArgumentError):
    """A work unit with some of its images stored and some not (see :func:`pending`)."""


class CorruptResultsError(ResultStoreError):
    """A result file damaged other than by an interrupted last write: a bad line before the last one,
    or the same key twice in one file."""


# ------------------------------------------------------------------------------------------- records


def _key_problem(record: Any) -> str | None:
    """Why ``record`` is not a valid record (None when it is)."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object (dict), not {type(record).__name__}"
    for field in ("config", "prompt_id"):
        if field not in record:
            return f"the record has no {field!r} field"
        value = record[field]
        if not isinstance(value, str) or not value:
            return f"{field!r} must be a non-empty string, not {value!r}"
    if "index" not in record:
        return "the record has no 'index' field"
    index = record["index"]
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        return f"'index' must be an integer >= 0, not {index!r}"
    return None


def record_key(record: Mapping[str, Any]) -> Key:
    """The key ``(config, prompt_id, index)`` of a (valid) record."""
    return (record["config"], record["prompt_id"], record["index"])


def _encode(record: dict[str, Any], position: int) -> bytes:
    problem = _key_problem(record)
    if problem is not None:
        raise InvalidRecordError(
            f"result record #{position} cannot be stored: {problem}",
            hint='every record needs "config" (str), "prompt_id" (str) and "index" (int >= 0)',
        )
    try:
        text = json.dumps(record, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as error:
        raise InvalidRecordError(
            f"result record #{position} {record_key(record)} is not JSON: {error}",
            hint="store only str, int, float, bool, None, lists and dicts with str keys; "
            "NaN/inf are not JSON — store None (or a string) instead",
        ) from None
    return text.encode("ascii")


def _parse(path: Path, data: bytes) -> tuple[list[dict[str, Any]], dict[Key, int], int, str | None]:
    """Parse a result file's bytes.

    Returns the records, their keys (-> 1-based line number), the length in bytes of the valid part, and
    why the rest was dropped (None when nothing was). What is dropped is what an interrupted append can
    leave, and only at the end: a last line without its newline, a last line that does not parse, and
    the lines of an append whose closing line is missing (a write cut short exactly at a line end). A
    bad line before that, or a key on two lines, raises :class:`CorruptResultsError`.
    """
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline; else an unterminated last line
    records: list[dict[str, Any]] = []
    keys: dict[Key, int] = {}
    offset = 0
    closed = (0, 0)  # (bytes, records) up to the end of the last complete append
    dropped: list[str] = []
    for lineno, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            problem: str | None = f"not JSON ({error})"
        else:
            problem = _key_problem(record)
        if problem is not None:
            if lineno == len(lines) and not tail:
                dropped.append(f"its last line ({lineno}) is not a valid record: {problem}")
                break
            raise CorruptResultsError(
                f"{path}: line {lineno} is not a valid result record: {problem}",
                hint="only a file's end can be cut short by a crash, so this file was edited or damaged; "
                f"restore it, or remove line {lineno} by hand (those images will be regenerated)",
            )
        key = record_key(record)
        if key in keys:
            raise CorruptResultsError(
                f"{path}: {key} is stored twice, on lines {keys[key]} and {lineno}",
                hint="a result file never holds a key twice unless it was edited or concatenated; "
                "remove one of the two lines",
            )
        keys[key] = lineno
        records.append(record)
        offset += len(line) + 1
        if not line.endswith(_CONTINUES):
            closed = (offset, len(records))
    if tail:
        dropped.append(f"its last line ({len(lines) + 1}) has no newline")
    good, count = closed
    if count < len(records):
        dropped.append(f"the last {len(records) - count} record(s) are an append without its closing line")
        for record in records[count:]:
            del keys[record_key(record)]
        del records[count:]
    reason = "; ".join(dropped) + " (an interrupted write)" if dropped else None
    return records, keys, good, reason


# --------------------------------------------------------------------------------------------- store


class ResultStore:
    """An append-only JSONL file of result records, locked for writing while open.

    Opening it takes the lock (:class:`StoreLockedError` when another process holds it), creates the
    file (and its folder) if missing, reads every record and truncates an incomplete last line left by
    an interrupted write. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._records: list[dict[str, Any]] = []
        self._keys: dict[Key, int] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._acquire_lock()
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- opening

    def _acquire_lock(self) -> int:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode("ascii", "replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            by = f" (pid {holder})" if holder.isdigit() else ""
            raise StoreLockedError(
                f"{self.path} is locked{by}: another process is writing this run/shard",
                hint="wait for it or use --shard i/n to give each process its own part of the run",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # Who holds it, for the message above (information only: the flock is the lock).
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _open(self) -> None:
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        if created:
            _fsync_dir(self.path.parent)
        data = _read_fd(self._fd)
        self._records, self._keys, good, dropped = _parse(self.path, data)
        if dropped is not None:
            logger.warning(
                "%s: %s; truncated %d byte(s) after the last complete record (%d records kept)",
                self.path,
                dropped,
                len(data) - good,
                len(self._records),
            )
            os.ftruncate(self._fd, good)
            os.fsync(self._fd)
        self._size = good

    # -- reading

    def keys(self) -> set[Key]:
        """Every stored key ``(config, prompt_id, index)``."""
        return set(self._keys)

    def records(self, config: str | None = None) -> list[dict[str, Any]]:
        """The stored records in file order (all, or those of one ``config``), as read back from JSON."""
        return [dict(r) for r in self._records if config is None or r["config"] == config]

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    # -- writing

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Store ``records`` (one work unit: one prompt's batch of images) as one write + fsync.

        All or nothing: every record is validated first (key fields, types, JSON), and a key already
        stored — or twice in ``records`` — is refused with :class:`DuplicateResultError`.
        """
        if self._fd is None:
            raise ValueError(f"ResultStore({str(self.path)!r}) is closed")
        if isinstance(records, (Mapping, str, bytes)):
            raise InvalidRecordError(
                f"append() takes a sequence of records, not a {type(records).__name__}",
                hint="wrap a single record in a list: store.append([record])",
            )
        chunks: list[bytes] = []
        batch: dict[Key, int] = {}
        for position, record in enumerate(records):
            chunks.append(_encode(record, position))
            key = record_key(record)
            if key in self._keys:
                raise DuplicateResultError(
                    f"{key} is already stored in {self.path} (line {self._keys[key]}); "
                    "storing it again would regenerate that image",
                    hint="skip units that are done: iterate over pending(units, store.keys())",
                )
            if key in batch:
                raise DuplicateResultError(
                    f"{key} appears twice in one append (records #{batch[key]} and #{position})",
                    hint="each (config, prompt_id, index) is one image; give each image its own index",
                )
            batch[key] = position
        if not chunks:
            return
        data = b"".join(line + _CONTINUES + b"\n" for line in chunks[:-1]) + chunks[-1] + b"\n"
        self._write(data)
        lineno = len(self._records)
        for chunk in chunks:
            # What a reopen would read back (tuples become lists, ...), not the caller's objects.
            record = json.loads(chunk)
            lineno += 1
            self._keys[record_key(record)] = lineno
            self._records.append(record)

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        start = self._size
        try:
            written = os.write(self._fd, data)
            while written < len(data):  # a short write (signal, disk full): finish it, or fail below
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)
        except BaseException:
            # Never leave a partial line in the middle of a live file: later appends would follow it.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            raise
        self._size = start + len(data)

    # -- closing

    def close(self) -> None:
        """Close the file and release the lock (idempotent). Reading methods keep working."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        lock_fd, self._lock_fd = self._lock_fd, None
        if lock_fd is not None:
            # The lock file stays: deleting it would let two processes lock two different files.
            os.close(lock_fd)  # releases the flock

    @property
    def closed(self) -> bool:
        return self._fd is None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"ResultStore({str(self.path)!r}, {len(self)} records, {state})"


def _read_fd(fd: int) -> bytes:
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _fsync_dir(folder: Path) -> None:
    """Make a new file's directory entry durable too (best effort: not every filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Shard:
    """Part ``index`` (0-based, like ``RANK``) of ``count`` parts of a run's work.

    Written 1-based for people: ``str(Shard(1, 3)) == "2/3"``, as on the command line (``--shard 2/3``)
    and in the file name (``results-2-of-3.jsonl``).
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        for name in ("index", "count"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgumentError(
                    f"Shard.{name} must be an int, not {value!r}", hint="Shard(index=0, count=2)"
                )
        if self.count < 1:
            raise InvalidArgumentError(
                f"a run cannot be split into {self.count} parts", hint="the number of parts must be >= 1"
            )
        if not 0 <= self.index < self.count:
            raise InvalidArgumentError(
                f"Shard(index={self.index}, count={self.count}): index must be in 0..{self.count - 1}",
                hint="Shard.index is 0-based; --shard i/n on the command line is 1-based",
            )

    @property
    def number(self) -> int:
        """The 1-based part number, as written on the command line and in file names."""
        return self.index + 1

    def __str__(self) -> str:
        return f"{self.number}/{self.count}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Shard | None:
        """The shard of this process under ``torchrun`` / ``accelerate launch``, or None.

        Reads ``RANK`` and ``WORLD_SIZE`` (``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` when those are absent).
        None when none of them is set or the world has one process; an inconsistent or non-integer
        setting is an :class:`~safelatent.errors.InvalidArgumentError`.
        """
        env = os.environ if environ is None else environ

        def lookup(*names: str) -> tuple[str, int] | None:
            for name in names:
                text = env.get(name, "").strip()
                if text:
                    try:
                        return name, int(text)
                    except ValueError:
                        raise InvalidArgumentError(
                            f"environment variable {name}={text!r} is not an integer",
                            hint="it is set by torchrun / accelerate launch; unset it or fix its value",
                        ) from None
            return None

        rank = lookup("RANK", "LOCAL_RANK")
        size = lookup("WORLD_SIZE", "LOCAL_WORLD_SIZE")
        if size is None:
            if rank is None or rank[1] == 0:
                return None
            raise InvalidArgumentError(
                f"{rank[0]}={rank[1]} is set but neither WORLD_SIZE nor LOCAL_WORLD_SIZE is",
                hint="launch with torchrun / accelerate launch (they set both), or use --shard i/n",
            )
        if size[1] == 1 and (rank is None or rank[1] == 0):
            return None
        if rank is None:
            raise InvalidArgumentError(
                f"{size[0]}={size[1]} is set but neither RANK nor LOCAL_RANK is",
                hint="launch with torchrun / accelerate launch (they set both), or use --shard i/n",
            )
        if size[1] < 1 or not 0 <= rank[1] < size[1]:
            raise InvalidArgumentError(
                f"{rank[0]}={rank[1]} does not fit {size[0]}={size[1]}",
                hint=f"{rank[0]} must be in 0..{size[0]}-1; unset both to run as a single process",
            )
        return cls(index=rank[1], count=size[1])


def parse_shard(text: str) -> Shard:
    """``"i/n"`` (1-based: ``"1/3"`` is the first of three parts) -> ``Shard(index=i - 1, count=n)``."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None:
        raise InvalidArgumentError(
            f"--shard {text!r} is not of the form i/n",
            hint="give the part to run and the number of parts, both integers, 1-based: "
            "--shard 2/3 runs the second of three parts",
        )
    number, count = int(match[1]), int(match[2])
    if count < 1:
        raise InvalidArgumentError(
            f"--shard {text}: a run cannot be split into {count} parts",
            hint="the number of parts (after the slash) must be at least 1, e.g. --shard 1/2",
        )
    if number == 0:
        raise InvalidArgumentError(
            f"--shard {text}: parts are numbered from 1",
            hint=f"--shard 1/{count} is the first part and --shard {count}/{count} the last",
        )
    if number > count:
        raise InvalidArgumentError(
            f"--shard {text}: there are only {count} part(s)",
            hint=f"use --shard 1/{count} ... --shard {count}/{count}",
        )
    return Shard(index=number - 1, count=count)


def shard_items(items: Sequence[T], shard: Shard | None) -> list[T]:
    """This shard's items: item ``k`` goes to shard ``k % count`` (all items when ``shard`` is None).

    Over all shards: no item missing, none twice, and the same assignment whenever ``items`` is the
    same list — so shard the full work list, not what is still pending (that changes as shards work).
    """
    if shard is None:
        return list(items)
    return list(items[shard.index :: shard.count])


def shard_store_path(run_dir: str | os.PathLike[str], shard: Shard | None) -> Path:
    """``<run_dir>/results.jsonl`` for a single process, ``<run_dir>/results-<i>-of-<n>.jsonl``
    (``i`` 1-based) for a shard."""
    run_dir = Path(run_dir)
    if shard is None:
        return run_dir / RESULTS_NAME
    return run_dir / f"results-{shard.number}-of-{shard.count}.jsonl"


def _file_order(path: Path) -> tuple[int, int, int, str]:
    if path.name == RESULTS_NAME:
        return (0, 0, 0, path.name)
    match = _SHARD_FILE.match(path.name)
    if match:
        return (1, int(match[2]), int(match[1]), path.name)
    return (2, 0, 0, path.name)


def read_all(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a run folder: all its ``results*.jsonl`` files merged (``results.jsonl`` first,
    then shard files by count and number), each in file order.

    Read-only and lock-free, so it works while shards are still writing: an incomplete last line (a
    write in flight, or a killed writer's leftover) is skipped with a warning, not truncated. A key in two
    files is a :class:`DuplicateResultError` naming both.
    """
    run_dir = Path(run_dir)
    merged: list[dict[str, Any]] = []
    seen: dict[Key, tuple[Path, int]] = {}
    for path in sorted(run_dir.glob("results*.jsonl"), key=_file_order):
        if not path.is_file():
            continue
        records, keys, _good, dropped = _parse(path, path.read_bytes())
        if dropped is not None:
            logger.warning(
                "%s: %s; skipped (it is being written, or was cut short by a crash)", path, dropped
            )
        for record in records:
            key = record_key(record)
            if key in seen:
                other, other_line = seen[key]
                raise DuplicateResultError(
                    f"{key} is stored twice: {other} line {other_line} and {path} line {keys[key]}",
                    hint="two processes generated the same image (e.g. the same --shard twice, or "
                    "pending work computed from one shard file only); delete one of the two lines",
                )
            seen[key] = (path, keys[key])
            merged.append(record)
    return merged


# ------------------------------------------------------------------------------------------ work units


def pending(
    units: Iterable[tuple[str, str, Iterable[int]]], store_keys: Collection[Key]
) -> Iterator[tuple[str, str, Iterable[int]]]:
    """The work units ``(config, prompt_id, indices)`` that still have to be generated.

    A unit is generated and appended whole, so it is either fully stored (skipped) or not at all
    (yielded, as given). Some of its images stored and others not raises :class:`PartialUnitError`:
    single-write appends cannot cause that, a changed number of images per prompt can.
    """
    for unit in units:
        config, prompt_id, indices = unit
        wanted = list(indices)
        present = [i for i in wanted if (config, prompt_id, i) in store_keys]
        if not present and wanted:
            yield unit
        elif len(present) < len(wanted):
            missing = sorted(set(wanted) - set(present))
            raise PartialUnitError(
                f"config {config!r}, prompt {prompt_id!r}: images {sorted(present)} are stored but "
                f"{missing} are not",
                hint="a unit is stored whole, so the run's settings changed (e.g. images per prompt); "
                "resume with the settings it was started with, or use a new run folder",
            )

"""The eval result store (append-only JSONL, crash recovery, lock) and the work splitting (shards)."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from safelatent.errors import InvalidArgumentError, SafelatentError
from safelatent.eval import store as store_module
from safelatent.eval.store import (
    CorruptResultsError,
    DuplicateResultError,
    InvalidRecordError,
    PartialUnitError,
    ResultStore,
    Shard,
    StoreLockedError,
    parse_shard,
    pending,
    read_all,
    record_key,
    shard_items,
    shard_store_path,
)


def unit_records(config: str, prompt_id: str, n: int = 3, **extra) -> list[dict]:
    return [{"config": config, "prompt_id": prompt_id, "index": i, "nsfw": i / 10, **extra} for i in range(n)]


def run_python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip(tmp_path):
    path = tmp_path / "run" / "results.jsonl"
    with ResultStore(path) as store:
        assert len(store) == 0 and store.keys() == set() and store.records() == []
        store.append(unit_records("baseline", "i2p:17", extra=(1, 2)))
        store.append(unit_records("sld-medium", "i2p:17", 2, label="é ✓"))
        store.append([])  # nothing to do, nothing written
        assert len(store) == 5
        assert ("baseline", "i2p:17", 2) in store
        assert ("baseline", "i2p:17", 3) not in store and "junk" not in store
        in_memory = store.records()
    assert in_memory[0] == {
        "config": "baseline",
        "prompt_id": "i2p:17",
        "index": 0,
        "nsfw": 0.0,
        "extra": [1, 2],
    }
    assert path.read_bytes().count(b"\n") == 5

    with ResultStore(path) as store:
        assert store.records() == in_memory  # what was kept in memory is what a reopen reads
        assert [r["index"] for r in store.records("sld-medium")] == [0, 1]
        assert store.records("sld-medium")[1]["label"] == "é ✓"
        assert store.keys() == {("baseline", "i2p:17", i) for i in range(3)} | {
            ("sld-medium", "i2p:17", i) for i in range(2)
        }
        store.records()[0]["config"] = "mutated"  # callers get copies
        assert store.records()[0]["config"] == "baseline"
    # Plain JSON lines for any reader.
    assert [json.loads(line)["index"] for line in path.read_text().splitlines()] == [0, 1, 2, 0, 1]


def test_one_write_and_fsync_per_append(tmp_path, monkeypatch):
    writes, syncs = [], []
    real_write, real_fsync = os.write, os.fsync
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(data) or real_write(fd, data))
    monkeypatch.setattr(os, "fsync", lambda fd: syncs.append(fd) or real_fsync(fd))
    with ResultStore(tmp_path / "results.jsonl") as store:
        syncs.clear()
        store.append(unit_records("baseline", "p1", 5))
        assert len(writes) == 1 and writes[0].count(b"\n") == 5 and len(syncs) == 1


def test_failed_write_leaves_no_partial_line(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    with ResultStore(path) as store:
        store.append(unit_records("baseline", "p1"))
        before = path.read_bytes()
        real_write = os.write
        calls = []

        def short_then_full_disk(fd, data):
            calls.append(len(data))
            if len(calls) == 1:
                return real_write(fd, data[: len(data) // 2])  # a short write...
            raise OSError(28, "No space left on device")  # ...then the disk is full

        monkeypatch.setattr(os, "write", short_then_full_disk)
        with pytest.raises(OSError, match="No space"):
            store.append(unit_records("baseline", "p2"))
        monkeypatch.setattr(os, "write", real_write)
        assert path.read_bytes() == before and ("baseline", "p2", 0) not in store
        store.append(unit_records("baseline", "p2"))  # the store goes on, with nothing in between
    with ResultStore(path) as store:
        assert len(store) == 6


# ------------------------------------------------------------------------------- refusals, validation


def test_duplicates_are_refused_and_nothing_is_written(tmp_path):
    path = tmp_path / "results.jsonl"
    with ResultStore(path) as store:
        store.append(unit_records("baseline", "i2p:1"))
        before = path.read_bytes()
        with pytest.raises(DuplicateResultError, match=r"would regenerate") as info:
            store.append(
                [{"config": "baseline", "prompt_id": "i2p:2", "index": 0}, *unit_records("baseline", "i2p:1")]
            )
        assert "('baseline', 'i2p:1', 0)" in str(info.value) and info.value.hint
        assert isinstance(info.value, InvalidArgumentError)
        with pytest.raises(DuplicateResultError, match="twice in one append"):
            store.append(unit_records("baseline", "i2p:3") + unit_records("baseline", "i2p:3"))
        assert path.read_bytes() == before and len(store) == 3
    with ResultStore(path) as store, pytest.raises(DuplicateResultError, match="would regenerate"):
        store.append(unit_records("baseline", "i2p:1")[1:2])  # also after a reopen


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt_id": "p", "index": 0}, "no 'config'"),
        ({"config": "c", "index": 0}, "no 'prompt_id'"),
        ({"config": "c", "prompt_id": "p"}, "no 'index'"),
        ({"config": 3, "prompt_id": "p", "index": 0}, "'config' must be a non-empty string"),
        ({"config": "", "prompt_id": "p", "index": 0}, "'config' must be a non-empty string"),
        ({"config": "c", "prompt_id": 17, "index": 0}, "'prompt_id' must be a non-empty string"),
        ({"config": "c", "prompt_id": "p", "index": "0"}, "'index' must be an integer"),
        ({"config": "c", "prompt_id": "p", "index": 1.0}, "'index' must be an integer"),
        ({"config": "c", "prompt_id": "p", "index": True}, "'index' must be an integer"),
        ({"config": "c", "prompt_id": "p", "index": -1}, "'index' must be an integer >= 0"),
        ({"config": "c", "prompt_id": "p", "index": 0, "score": math.nan}, "not JSON"),
        ({"config": "c", "prompt_id": "p", "index": 0, "image": object()}, "not JSON"),
        ({"config": "c", "prompt_id": "p", "index": 0, 1: "int key"}, None),  # JSON turns it into "1"
        (["config", "c"], "must be a JSON object"),
    ],
)
def test_record_validation(tmp_path, record, message):
    path = tmp_path / "results.jsonl"
    with ResultStore(path) as store:
        good = {"config": "c", "prompt_id": "other", "index": 0}
        if message is None:
            store.append([good, record])
            assert store.records()[1]["1"] == "int key"
            return
        with pytest.raises(InvalidRecordError, match=message) as info:
            store.append([good, record])  # all or nothing: the good one is not written either
        assert "#1" in str(info.value) and info.value.hint and isinstance(info.value, InvalidArgumentError)
        assert len(store) == 0 and path.read_bytes() == b""


def test_append_wants_a_sequence(tmp_path):
    with ResultStore(tmp_path / "results.jsonl") as store:
        with pytest.raises(InvalidRecordError, match="not a dict"):
            store.append({"config": "c", "prompt_id": "p", "index": 0})
        store.close()
        with pytest.raises(ValueError, match="closed"):
            store.append(unit_records("c", "p"))
        assert store.closed


# ---------------------------------------------------------------------------------- crash recovery


def test_truncated_last_line_is_dropped_on_open(tmp_path, caplog):
    path = tmp_path / "results.jsonl"
    with ResultStore(path) as store:
        store.append(unit_records("baseline", "p1"))
        store.append(unit_records("baseline", "p2"))
    intact = path.read_bytes()
    line = json.dumps({"config": "baseline", "prompt_id": "p3", "index": 0}).encode()
    with path.open("ab") as f:
        f.write(line[: len(line) // 2])  # what a killed writer leaves

    with caplog.at_level(logging.WARNING, logger="safelatent.eval.store"), ResultStore(path) as store:
        assert path.read_bytes() == intact
        assert len(store) == 6 and ("baseline", "p3", 0) not in store
        store.append(unit_records("baseline", "p3"))
    assert "no newline" in caplog.text and "truncated" in caplog.text
    with ResultStore(path) as store:
        assert [r["prompt_id"] for r in store.records()] == ["p1"] * 3 + ["p2"] * 3 + ["p3"] * 3


@pytest.mark.parametrize(
    "leftover",
    [
        b'{"config":"baseline","prompt_id":"p3","ind\n',  # a last line that does not parse
        b'{"config":"baseline","prompt_id":"p3","index":0} \n',  # the first line of an unfinished append
        b'{"config":"baseline","prompt_id":"p3","index":0} \n'
        b'{"config":"baseline","prompt_id":"p3","index":1} \n',
        b'{"config":"baseline","prompt_id":"p3","index":0} \n{"config":"baseline","prompt_id":"p3","i',
        b"\x00\x00\x00\x00",
    ],
)
def test_any_unfinished_append_is_dropped_on_open(tmp_path, leftover):
    path = tmp_path / "results.jsonl"
    with ResultStore(path) as store:
        store.append(unit_records("baseline", "p1"))
    intact = path.read_bytes()
    with path.open("ab") as f:
        f.write(leftover)
    assert [r["prompt_id"] for r in read_all(tmp_path)] == ["p1"] * 3  # readers skip it...
    assert path.read_bytes() == intact + leftover  # ...without touching the file
    with ResultStore(path) as store:
        assert path.read_bytes() == intact and len(store) == 3
        assert list(pending([("baseline", "p3", range(3))], store.keys())) == [("baseline", "p3", range(3))]


def test_write_cut_short_at_a_line_end_drops_the_whole_unit(tmp_path):
    path = tmp_path / "results.jsonl"
    with ResultStore(path) as store:
        store.append(unit_records("baseline", "p1"))
        store.append(unit_records("baseline", "p2"))
    data = path.read_bytes()
    lines = data.split(b"\n")[:-1]
    # Every line of an append but its last carries the "continues" space; the closing line does not.
    assert [line.endswith(b" ") for line in lines] == [True, True, False] * 2
    assert all(json.loads(line) for line in lines)
    for keep in (4, 5):  # a kill between pages that happens to fall on a line end of unit p2
        path.write_bytes(b"".join(line + b"\n" for line in lines[:keep]))
        with ResultStore(path) as store:
            assert len(store) == 3 and path.read_bytes() == b"".join(line + b"\n" for line in lines[:3])
            assert list(pending([("baseline", "p2", range(3))], store.keys())) == [
                ("baseline", "p2", range(3))
            ]


def test_bad_line_in_the_middle_is_an_error_naming_it(tmp_path):
    path = tmp_path / "results.jsonl"
    with ResultStore(path) as store:
        store.append(unit_records("baseline", "p1"))
        store.append(unit_records("baseline", "p2"))
    lines = path.read_bytes().split(b"\n")
    lines[1] = b'{"config": "baseline", "prompt_id": "p1", "ind'
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(CorruptResultsError, match=r"line 2 is not a valid result record") as info:
        ResultStore(path)
    assert str(path) in str(info.value) and "line 2" in info.value.hint
    with pytest.raises(CorruptResultsError, match="line 2"):
        read_all(tmp_path)

    lines[1] = b'{"config": "baseline", "prompt_id": "p1", "index": "1"}'  # JSON, but not a record
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(CorruptResultsError, match=r"line 2 .*'index' must be an integer"):
        ResultStore(path)

    lines[1] = lines[0]  # the same key twice
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(CorruptResultsError, match="stored twice, on lines 1 and 2"):
        ResultStore(path)
    # The lock was released by the failed opens.
    lines[1] = b'{"config":"baseline","prompt_id":"p1","index":1} '
    path.write_bytes(b"\n".join(lines))
    with ResultStore(path) as store:
        assert len(store) == 6


WRITER = """
import sys, time
from safelatent.eval.store import ResultStore, pending

path, n_units, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
units = [("baseline", f"i2p:{u}", range(5)) for u in range(n_units)]
with ResultStore(path) as store:
    for config, prompt_id, indices in pending(units, store.keys()):
        records = [{"config": config, "prompt_id": prompt_id, "index": i, "pad": "x" * 300} for i in indices]
        store.append(records)
        time.sleep(pause)
print("done", len(store))
"""


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkill_mid_run_then_resume(tmp_path):
    path = tmp_path / "results.jsonl"
    n_units = 200
    writer = run_python(WRITER, str(path), str(n_units), "0.01")
    try:
        deadline = time.monotonic() + 15
        while complete_lines(path) < 3 * 5:  # let at least three appends land
            assert writer.poll() is None, writer.communicate()
            assert time.monotonic() < deadline, "the writer did not write"
            time.sleep(0.005)
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.kill()
        writer.communicate()
    assert writer.returncode == -signal.SIGKILL
    # The kill rarely lands inside a write by chance: leave what one does, a unit cut short mid-line.
    line = b'{"config":"baseline","prompt_id":"i2p:9999","index":0} \n{"config":"basel'
    with path.open("ab") as f:
        f.write(line)

    with ResultStore(path) as store:
        landed = store.keys()
    prompts = {prompt_id for _, prompt_id, _ in landed}
    assert 3 <= len(prompts) < n_units
    assert landed == {("baseline", p, i) for p in prompts for i in range(5)}  # whole units only
    assert b"i2p:9999" not in path.read_bytes()

    resumed = run_python(WRITER, str(path), str(n_units), "0")
    out, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, err
    assert out.split() == ["done", str(5 * n_units)]
    keys = [record_key(json.loads(line)) for line in path.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 5 * n_units  # every key exactly once
    assert set(keys) == {("baseline", f"i2p:{u}", i) for u in range(n_units) for i in range(5)}
    first_resumed = keys.index(next(k for k in keys if k[1] not in prompts))
    assert first_resumed == 5 * len(prompts)  # the resumed process wrote only the missing units


# ------------------------------------------------------------------------------------------------ lock

HOLDER = """
import sys
from safelatent.eval.store import ResultStore, StoreLockedError
try:
    store = ResultStore(sys.argv[1])
except StoreLockedError as error:
    print(error)
    sys.exit(3)
print("opened")
"""


def test_second_writer_is_refused_while_the_first_is_open(tmp_path):
    path = tmp_path / "results.jsonl"
    with ResultStore(path) as store:
        store.append(unit_records("baseline", "p1"))
        other = run_python(HOLDER, str(path))
        out, err = other.communicate(timeout=30)
        assert other.returncode == 3, err
        assert "another process is writing this run/shard" in out
        assert "wait for it or use --shard" in out
        assert f"pid {os.getpid()}" in out
        with pytest.raises(StoreLockedError, match="another process"):  # also a second open in-process
            ResultStore(path)
        assert len(store) == 3  # the refused opens touched nothing
    other = run_python(HOLDER, str(path))  # released on close
    out, err = other.communicate(timeout=30)
    assert other.returncode == 0 and out.strip() == "opened", err
    assert isinstance(StoreLockedError("x"), SafelatentError)


# ------------------------------------------------------------------------------------------- shards


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_shard_items_no_gap_no_overlap_stable(count):
    for length in range(24):
        items = [f"i2p:{k}" for k in range(length)]
        parts = [shard_items(items, Shard(i, count)) for i in range(count)]
        flat = [item for part in parts for item in part]
        assert sorted(flat) == sorted(items)  # no gap, and (same length) no item twice
        assert len(flat) == len(items)
        for i in range(count):
            for j in range(i + 1, count):
                assert not set(parts[i]) & set(parts[j])
            assert parts[i] == [items[k] for k in range(length) if k % count == i]  # round-robin
            assert shard_items(list(items), Shard(i, count)) == parts[i]  # stable
    assert shard_items((1, 2, 3), None) == [1, 2, 3]


def test_parse_shard():
    assert parse_shard("1/1") == Shard(0, 1)
    assert parse_shard("2/3") == Shard(index=1, count=3)
    assert parse_shard(" 3 / 3 ") == Shard(2, 3)
    assert str(Shard(1, 3)) == "2/3" and Shard(1, 3).number == 2
    for text, message in [
        ("0/3", "numbered from 1"),
        ("4/3", "only 3 part"),
        ("a/b", "not of the form i/n"),
        ("1/0", "cannot be split into 0 parts"),
        ("-1/3", "not of the form"),
        ("2", "not of the form"),
        ("", "not of the form"),
    ]:
        with pytest.raises(InvalidArgumentError, match=message) as info:
            parse_shard(text)
        assert info.value.hint
    for index, count in [(3, 3), (-1, 3), (0, 0), (True, 2), (0.0, 2)]:
        with pytest.raises(InvalidArgumentError):
            Shard(index, count)


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, Shard(1, 4)),
        ({"RANK": "0", "WORLD_SIZE": "1"}, None),
        ({"WORLD_SIZE": "1"}, None),
        ({"RANK": "0"}, None),
        ({"LOCAL_RANK": "2", "WORLD_SIZE": "3"}, Shard(2, 3)),
        ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, Shard(1, 2)),
        ({"RANK": "", "WORLD_SIZE": ""}, None),
    ],
)
def test_shard_from_env(monkeypatch, env, expected):
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Shard.from_env() == expected
    assert Shard.from_env(env) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 does not fit WORLD_SIZE=2"),
        ({"RANK": "1"}, "neither WORLD_SIZE"),
        ({"WORLD_SIZE": "2"}, "neither RANK"),
        ({"RANK": "1", "WORLD_SIZE": "1"}, "does not fit"),
    ],
)
def test_shard_from_env_errors(monkeypatch, env, message):
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InvalidArgumentError, match=message) as info:
        Shard.from_env()
    assert info.value.hint


def test_shard_store_paths_and_read_all(tmp_path, caplog):
    assert shard_store_path(tmp_path, None) == tmp_path / "results.jsonl"
    assert shard_store_path(tmp_path, parse_shard("2/3")) == tmp_path / "results-2-of-3.jsonl"
    assert read_all(tmp_path) == [] and read_all(tmp_path / "missing") == []

    units = [("baseline", f"i2p:{k}", range(2)) for k in range(11)]
    for index in (2, 0, 1):  # the order the shards run in does not matter
        shard = Shard(index, 3)
        with ResultStore(shard_store_path(tmp_path, shard)) as store:
            for config, prompt_id, indices in pending(shard_items(units, shard), store.keys()):
                store.append([{"config": config, "prompt_id": prompt_id, "index": i} for i in indices])
    with ResultStore(shard_store_path(tmp_path, Shard(0, 12))) as store:  # sorted by number, not by name
        store.append(unit_records("sld-max", "i2p:0", 1))
    with ResultStore(shard_store_path(tmp_path, Shard(9, 12))) as store:
        store.append(unit_records("sld-max", "i2p:9", 1))
    with ResultStore(shard_store_path(tmp_path, None)) as store:
        store.append(unit_records("sld-max", "i2p:legacy", 1))
    assert (tmp_path / "results-2-of-3.jsonl.lock").exists()  # lock files stay (and are not read)

    merged = read_all(tmp_path)
    keys = [record_key(r) for r in merged]
    assert len(keys) == len(set(keys)) == 11 * 2 + 3
    assert keys[0] == ("sld-max", "i2p:legacy", 0)
    assert keys[1:7] == [("baseline", f"i2p:{k}", i) for k in (0, 3, 6) for i in range(2)]  # 1/3 first
    assert keys[-2:] == [("sld-max", "i2p:0", 0), ("sld-max", "i2p:9", 0)]
    done = set(keys)
    assert list(pending([*units, ("sld-max", "i2p:1", [0])], done)) == [("sld-max", "i2p:1", [0])]

    # The same image in two files: refused, naming the key and both files.
    with ResultStore(shard_store_path(tmp_path, Shard(1, 2))) as store:
        store.append([{"config": "baseline", "prompt_id": "i2p:4", "index": 1, "again": True}])
    with pytest.raises(DuplicateResultError) as info:
        read_all(tmp_path)
    message = str(info.value)
    assert "('baseline', 'i2p:4', 1)" in message
    assert "results-2-of-3.jsonl line 4" in message and "results-2-of-2.jsonl line 1" in message


def test_pending():
    done = {("baseline", "p1", 0), ("baseline", "p1", 1), ("sld", "p1", 0)}
    units = [("baseline", "p1", range(2)), ("baseline", "p2", range(2)), ("sld", "p2", [0]), ("x", "p", [])]
    assert list(pending(units, done)) == [("baseline", "p2", range(2)), ("sld", "p2", [0])]
    with pytest.raises(PartialUnitError, match=r"images \[0\] are stored but \[1, 2\] are not") as info:
        list(pending([("sld", "p1", range(3))], done))  # e.g. more images per prompt than at the start
    assert "settings" in info.value.hint and isinstance(info.value, InvalidArgumentError)


def test_module_exports():
    for name in store_module.__all__:
        assert hasattr(store_module, name)

"""The audit log (layer 5): one append-only SQLite row per request, prompts or only their hashes, pHashes and
never pixels, triggers that refuse UPDATE/DELETE, a hash chain that shows edits, concurrent writers."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from safelatent.errors import InvalidArgumentError
from safelatent.safety.audit import (
    GENESIS_HASH,
    SCHEMA_VERSION,
    AuditEntry,
    AuditImage,
    AuditLog,
    AuditLogError,
    default_audit_db,
    derive_outcome,
    image_phash,
    phash_distance,
    sha256_text,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _image(seed: int, size: int = 64) -> Image.Image:
    """A small picture with structure (a gradient and a block), different per seed."""
    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    block = Image.new("RGB", (size // 3, size // 3), ((seed * 70) % 256, 40, 200))
    image.paste(block, ((seed * 13) % (size // 2), (seed * 29) % (size // 2)))
    return image.rotate(seed * 37 % 360)


def _entry(prompt: str = "a lighthouse at dusk", **kwargs) -> AuditEntry:
    defaults = {
        "normalized_prompt": prompt.lower(),
        "settings": {"prompts": [prompt], "seed": 7, "num_inference_steps": 20},
        "model_hash": "feedc0de",
        "adapters": [{"name": "ink", "hash": "0badf00d", "weight": 0.8}],
        "sld": {"enabled": True, "sld_preset": "medium", "concept": "violence"},
        "prompt_policy": {"action": "allow", "scores": {"violence": 0.1}, "message": ""},
        "classifiers": {"nsfw": {"score": 0.02, "action": "allow", "reasons": []}},
        "images": [AuditImage(phash=image_phash(_image(1)))],
    }
    defaults.update(kwargs)
    return AuditEntry(prompt=prompt, **defaults)


@pytest.fixture
def log(tmp_path):
    with AuditLog(tmp_path / "audit.sqlite3") as opened:
        yield opened


def test_record_and_query_round_trip(log):
    row = log.record(_entry(request_id="req-1"))
    assert row == 1
    (record,) = log.query()
    assert record.id == 1 and record.request_id == "req-1" and record.outcome == "generated"
    assert record.prompt == "a lighthouse at dusk" and record.prompt_sha256 == sha256_text(record.prompt)
    assert record.normalized == "a lighthouse at dusk"
    assert record.settings["seed"] == 7 and record.model_hash == "feedc0de"
    assert record.adapters == [{"name": "ink", "hash": "0badf00d", "weight": 0.8}]
    assert record.layers["sld"]["concept"] == "violence"
    assert record.layers["classifiers"]["nsfw"]["score"] == 0.02
    assert record.layers["prompt_policy"]["action"] == "allow"
    assert record.time.endswith("+00:00") and "T" in record.time
    assert record.images == [
        {"index": 0, "phash": image_phash(_image(1)), "withheld": False, "action": None, "reasons": []}
    ]
    assert record.prev_hash == GENESIS_HASH and len(record.row_hash) == 64
    json.dumps(record.to_dict())  # JSON-ready


def test_schema_version_wal_and_reopen(tmp_path):
    path = tmp_path / "nested" / "folder" / "audit.sqlite3"
    AuditLog(path).record(_entry())
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    raw.close()
    again = AuditLog(path, create=False)
    again.record(_entry("second"))
    assert [r.prompt for r in again.query()] == ["second", "a lighthouse at dusk"]
    assert again.verify_chain().ok


def test_store_prompt_false_keeps_only_hashes(log):
    prompt = "my private idea, a red fox"
    decision = {"action": "allow", "normalized_text": "my private idea a red fox", "message": ""}
    log.record(
        _entry(
            prompt,
            normalized_prompt="my private idea a red fox",
            store_prompt=False,
            prompt_policy=decision,
            settings={"prompts": [prompt], "negative_prompts": ["blurry, my secret"], "seed": 1},
        )
    )
    raw = sqlite3.connect(log.path)
    dump = "\n".join(raw.iterdump())
    assert "private idea" not in dump and "my secret" not in dump
    (record,) = log.query()
    assert record.prompt is None and record.normalized is None
    assert record.prompt_sha256 == sha256_text(prompt)
    assert record.normalized_sha256 == sha256_text("my private idea a red fox")
    assert record.prompt_shown == f"sha256:{sha256_text(prompt)}"
    assert record.settings["prompts"] == [f"sha256:{sha256_text(prompt)}"]
    assert record.settings["seed"] == 1
    # the exact prompt still finds the row through its hash; a fragment cannot
    assert len(log.query(contains=prompt)) == 1
    assert log.query(contains="red fox") == []


def test_pixels_are_never_stored_only_phashes(log):
    kept, withheld = _image(2, 128), _image(3, 128)
    images = [
        AuditImage.from_image(kept),
        AuditImage.from_image(withheld, withheld=True, reasons=["nsfw 0.97"]),
    ]
    log.record(_entry(images=images))
    (record,) = log.query()
    assert record.outcome == "partially-withheld"
    assert record.images[1] == {
        "index": 1,
        "phash": image_phash(withheld),
        "withheld": True,
        "action": None,
        "reasons": ["nsfw 0.97"],
    }
    assert record.reasons == ["image 1: nsfw 0.97"]
    # nothing image-sized in the file: every column of the row is short text
    raw = sqlite3.connect(log.path)
    row = raw.execute("SELECT * FROM audit_requests").fetchone()
    assert all(not isinstance(v, bytes) for v in row)
    assert max(len(str(v)) for v in row) < 1000
    assert phash_distance(image_phash(withheld), image_phash(withheld.resize((96, 96)))) <= 8
    hits = log.find_image(withheld.resize((100, 100)))
    assert hits and hits[0][1] == 1 and hits[0][2] <= 8


def test_outcomes(log):
    assert derive_outcome(True, []) == "blocked"
    assert derive_outcome(False, []) == "generated"
    assert derive_outcome(False, [AuditImage("0" * 16, withheld=True)]) == "withheld"
    blocked = {"action": "block", "message": "sexual content involving minors", "actions": {}}
    log.record(_entry(prompt_policy=blocked, images=[]))
    assert log.query()[0].outcome == "blocked"
    assert log.query()[0].reasons == ["prompt: sexual content involving minors"]
    with pytest.raises(InvalidArgumentError, match="unknown audit outcome"):
        log.record(_entry(outcome="maybe"))


def test_policy_decision_objects_are_stored_with_as_dict(log):
    @dataclass
    class Decision:
        action: str = "suppress"
        scores: dict = field(default_factory=lambda: {"violence": 0.7})

        def as_dict(self):
            return {"action": self.action, "scores": self.scores, "actions": {"violence": "suppress"}}

    log.record(_entry(prompt_policy=Decision()))
    record = log.query()[0]
    assert record.layers["prompt_policy"]["scores"] == {"violence": 0.7}
    assert record.reasons == ["prompt: suppress violence"]


def test_query_filters(log):
    times = ["2026-01-01T10:00:00", "2026-01-02T10:00:00", "2026-01-03T10:00:00"]
    log.record(_entry("a cat", time=times[0]))
    log.record(
        _entry("a dog", time=times[1], prompt_policy={"action": "block", "message": "nope"}, images=[])
    )
    log.record(_entry("A CAT again", time=times[2], request_id="special_id%"))
    assert [r.prompt for r in log.query()] == ["A CAT again", "a dog", "a cat"]
    assert [r.prompt for r in log.query(since="2026-01-02")] == ["A CAT again", "a dog"]
    assert [r.prompt for r in log.query(until="2026-01-02T10:00:00Z")] == ["a cat"]
    assert [r.prompt for r in log.query(since="2026-01-02T11:00:00+01:00")] == ["A CAT again", "a dog"]
    assert [r.prompt for r in log.query(outcome="blocked")] == ["a dog"]
    assert [r.prompt for r in log.query(contains="cat")] == ["A CAT again", "a cat"]
    assert [r.prompt for r in log.query(contains="nope")] == ["a dog"]  # reasons are searched
    assert [r.prompt for r in log.query(contains="_id%")] == ["A CAT again"]  # LIKE wildcards escaped
    assert log.query(contains="id_") == []
    assert len(log.query(limit=1)) == 1 and len(log.query(limit=None)) == 3
    with pytest.raises(InvalidArgumentError, match="not an ISO 8601"):
        log.query(since="yesterday")
    with pytest.raises(InvalidArgumentError, match="unknown outcome"):
        log.query(outcome="exploded")


def test_update_and_delete_are_refused_by_the_database(log):
    log.record(_entry())
    raw = sqlite3.connect(log.path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        raw.execute("UPDATE audit_requests SET outcome = 'blocked'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        raw.execute("DELETE FROM audit_requests")
    raw.close()
    assert log.query()[0].outcome == "generated" and len(log) == 1


def _tamper(path: Path, sql: str, *params) -> None:
    """What someone with write access could do: drop the triggers and edit the file."""
    raw = sqlite3.connect(path)
    raw.execute("DROP TRIGGER audit_requests_no_update")
    raw.execute("DROP TRIGGER audit_requests_no_delete")
    raw.execute(sql, params)
    raw.commit()
    raw.close()


def test_verify_chain_reports_the_first_edited_row(tmp_path):
    path = tmp_path / "audit.sqlite3"
    log = AuditLog(path)
    for i in range(5):
        log.record(_entry(f"prompt {i}"))
    report = log.verify_chain()
    assert report.ok and report.rows == 5 and report.first_broken is None
    assert report.last_hash == log.query(limit=1)[0].row_hash
    _tamper(path, "UPDATE audit_requests SET prompt = ? WHERE id = 3", "an innocent prompt")
    report = log.verify_chain()
    assert not report.ok and report.first_broken == 3 and report.rows == 2
    assert "edited" in report.reason and "row 3" in report.summary()


def test_verify_chain_reports_a_deleted_row(tmp_path):
    path = tmp_path / "audit.sqlite3"
    log = AuditLog(path)
    for i in range(4):
        log.record(_entry(f"prompt {i}"))
    _tamper(path, "DELETE FROM audit_requests WHERE id = ?", 2)
    report = log.verify_chain()
    assert not report.ok and report.first_broken == 3 and "prev_hash" in report.reason


def test_concurrent_writers_in_one_process_keep_a_linear_chain(log):
    def write(worker: int) -> None:
        for i in range(10):
            log.record(_entry(f"w{worker} p{i}", images=[]))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(log) == 40
    assert log.verify_chain().ok


def test_concurrent_writers_across_processes(tmp_path):
    path = tmp_path / "audit.sqlite3"
    AuditLog(path).close()
    script = (
        "import sys; from safelatent.safety.audit import AuditLog, AuditEntry\n"
        "log = AuditLog(sys.argv[1])\n"
        "for i in range(15): log.record(AuditEntry(prompt=f'{sys.argv[2]} {i}'))\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(path), f"proc{n}"], env=env) for n in range(3)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    log = AuditLog(path, create=False)
    assert len(log) == 45 and log.verify_chain().ok
    assert {r.prompt.split()[0] for r in log.query(limit=None)} == {"proc0", "proc1", "proc2"}


def test_clear_errors_for_missing_and_foreign_files(tmp_path):
    with pytest.raises(AuditLogError, match="no audit log at") as missing:
        AuditLog(tmp_path / "nope.sqlite3", create=False)
    assert "--db" in str(missing.value) and not (tmp_path / "nope.sqlite3").exists()
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database at all, just text " * 100)
    with pytest.raises(AuditLogError, match="not an SQLite database"):
        AuditLog(junk)
    other = tmp_path / "other.sqlite3"
    raw = sqlite3.connect(other)
    raw.execute("CREATE TABLE things (x)")
    raw.commit()
    raw.close()
    with pytest.raises(AuditLogError, match="not a safelatent audit log"):
        AuditLog(other)
    with pytest.raises(AuditLogError, match="is a folder"):
        AuditLog(tmp_path)
    newer = tmp_path / "newer.sqlite3"
    AuditLog(newer).close()
    raw = sqlite3.connect(newer)
    raw.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    raw.commit()
    raw.close()
    with pytest.raises(AuditLogError, match="upgrade safelatent"):
        AuditLog(newer)


def test_default_path(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFELATENT_AUDIT_DB", str(tmp_path / "x.db"))
    assert default_audit_db() == tmp_path / "x.db"
    monkeypatch.delenv("SAFELATENT_AUDIT_DB")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_audit_db() == tmp_path / "data" / "safelatent" / "audit.sqlite3"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_audit_db() == tmp_path / "home" / ".local" / "share" / "safelatent" / "audit.sqlite3"


@dataclass(frozen=True)
class _Settings:
    """The fields of ``safelatent.api.GenerationSettings`` that ``from_generation`` reads (importing the
    real class pulls in torch and diffusers: ~10 s)."""

    prompts: tuple[str, ...]
    sld: dict | None
    model_hash: str
    loras: list[dict]
    seed: int = 3

    def as_dict(self) -> dict:
        return {
            "prompts": list(self.prompts),
            "sld": self.sld,
            "model_hash": self.model_hash,
            "seed": self.seed,
        }


@dataclass
class GenerationResult:
    images: list
    settings: _Settings


def test_from_generation_uses_settings_hashes_and_images(log):
    lora = {
        "name": "ink",
        "path": "/x",
        "weight": 1.0,
        "hash": "f00d",
        "format": "kohya",
        "trigger_words": [],
    }
    settings = _Settings(
        prompts=("a castle",),
        sld={"sld_preset": "medium", "concept": "gore"},
        model_hash="abc123",
        loras=[lora],
    )
    result = GenerationResult(images=[_image(4), _image(5)], settings=settings)
    entry = AuditEntry.from_generation(
        result, request_id="r-9", withheld={1: ["nsfw 0.99"]}, classifiers=[{"nsfw": 0.1}, {"nsfw": 0.99}]
    )
    log.record(entry)
    (record,) = log.query()
    assert record.request_id == "r-9" and record.model_hash == "abc123"
    assert record.adapters == [{"name": "ink", "hash": "f00d", "weight": 1.0, "format": "kohya"}]
    assert record.layers["sld"] == {"enabled": True, "sld_preset": "medium", "concept": "gore"}
    assert record.outcome == "partially-withheld"
    assert [im["phash"] for im in record.images] == [image_phash(_image(4)), image_phash(_image(5))]
    assert record.settings["prompts"] == ["a castle"]


@dataclass(frozen=True)
class _Decision:
    """Shaped like ``classifiers.actions.Decision``: it carries the (blurred) image itself."""

    index: int
    action: str
    image: object
    reasons: tuple[str, ...]
    triggers: tuple = ()


def test_classifier_decisions_set_actions_and_never_leak_pixels(log):
    import numpy as np

    images = [_image(6), _image(7), _image(8)]
    settings = _Settings(prompts=("a beach",), sld=None, model_hash="abc", loras=[])
    decisions = [
        _Decision(0, "keep", images[0], ("nudity 0.01 < 0.60",)),
        _Decision(1, "blur", images[1].resize((8, 8)), ("blur: nudity 0.70 ≥ 0.60",)),
        _Decision(2, "withhold", None, ("withhold: nudity 0.95 ≥ 0.60",)),
    ]
    entry = AuditEntry.from_generation(
        GenerationResult(images=images, settings=settings), decisions=decisions
    )
    entry.settings["sneaky"] = {"pixels": np.zeros((4, 4, 3)), "raw": b"\x00" * 64, "picture": images[0]}
    log.record(entry)
    (record,) = log.query()
    assert [im["action"] for im in record.images] == ["keep", "blur", "withhold"]
    assert [im["withheld"] for im in record.images] == [False, False, True]
    assert record.images[0]["reasons"] == []  # a kept image's below-threshold scores are not reasons
    assert record.outcome == "partially-withheld" and record.layers["sld"] == {"enabled": False}
    assert record.reasons == ["image 1: blur: nudity 0.70 ≥ 0.60", "image 2: withhold: nudity 0.95 ≥ 0.60"]
    assert record.layers["classifiers"][1] == {
        "index": 1,
        "action": "blur",
        "reasons": ["blur: nudity 0.70 ≥ 0.60"],
        "triggers": [],
    }
    assert record.settings["sneaky"] == {
        "pixels": "<omitted: pixels>",
        "raw": "<omitted: pixels>",
        "picture": "<omitted: pixels>",
    }
    assert "image" not in json.dumps(record.layers["classifiers"][1])


def test_record_accepts_a_dict(log):
    row = log.record({"prompt": "p", "images": [{"phash": "ff00ff00ff00ff00", "withheld": True}]})
    assert row == 1 and log.query()[0].outcome == "withheld"

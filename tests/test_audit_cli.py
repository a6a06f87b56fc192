"""`safelatent audit` and `safelatent audit verify` through the audit sub-app (CliRunner): table and JSON
lines, filters, the default database from $SAFELATENT_AUDIT_DB, one-line errors, exit statuses."""

from __future__ import annotations

import json
import sqlite3

import pytest
import typer
from typer.testing import CliRunner

from safelatent.audit_cli import audit_app, register
from safelatent.safety.audit import AuditEntry, AuditImage, AuditLog, sha256_text

runner = CliRunner()


@pytest.fixture
def db(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFELATENT_AUDIT_DB", str(tmp_path / "default.sqlite3"))
    monkeypatch.setenv("COLUMNS", "200")
    path = tmp_path / "audit.sqlite3"
    with AuditLog(path) as log:
        log.record(
            AuditEntry(prompt="a lighthouse at dusk", request_id="req-one", time="2026-03-01T08:00:00Z")
        )
        log.record(
            AuditEntry(
                prompt="something forbidden",
                request_id="req-two",
                prompt_policy={"action": "block", "message": "violence: graphic gore"},
                time="2026-03-02T08:00:00Z",
            )
        )
        log.record(
            AuditEntry(
                prompt="my private prompt",
                store_prompt=False,
                request_id="req-three",
                images=[AuditImage("00ff00ff00ff00ff"), AuditImage("ff00ff00ff00ff00", True, ("nsfw 0.98",))],
                time="2026-03-03T08:00:00Z",
            )
        )
    return path


def test_table_lists_newest_first_with_prompt_or_hash_and_reasons(db):
    result = runner.invoke(audit_app, ["--db", str(db)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "a lighthouse at dusk" in out and "req-one" in out and "generated" in out
    assert "blocked" in out and "violence: graphic gore" in out
    assert "my private prompt" not in out and f"sha256:{sha256_text('my private prompt')[:16]}" in out
    assert "partially-withheld" in out and "image 1: nsfw 0.98" in out
    assert out.index("req-three") < out.index("req-two") < out.index("req-one")


def test_json_lines_and_filters(db):
    result = runner.invoke(audit_app, ["--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["request_id"] for r in rows] == ["req-three", "req-two", "req-one"]
    assert rows[0]["prompt"] is None and rows[0]["images"][1]["withheld"] is True
    assert set(rows[0]) >= {"time", "settings", "layers", "model_hash", "adapters", "row_hash", "prev_hash"}

    def ids(*args: str) -> list[str]:
        res = runner.invoke(audit_app, ["--db", str(db), "--json", *args])
        assert res.exit_code == 0, res.output
        return [json.loads(line)["request_id"] for line in res.stdout.splitlines()]

    assert ids("--outcome", "blocked") == ["req-two"]
    assert ids("--since", "2026-03-02") == ["req-three", "req-two"]
    assert ids("--until", "2026-03-02") == ["req-one"]
    assert ids("--grep", "LIGHTHOUSE") == ["req-one"]
    assert ids("--grep", "my private prompt") == ["req-three"]  # exact prompt matches its hash
    assert ids("--limit", "1") == ["req-three"]


def test_no_match_is_not_an_error(db):
    result = runner.invoke(audit_app, ["--db", str(db), "--grep", "zebra"])
    assert result.exit_code == 0 and "no audited requests match" in result.output


def test_default_db_comes_from_the_environment(db, monkeypatch):
    monkeypatch.setenv("SAFELATENT_AUDIT_DB", str(db))
    result = runner.invoke(audit_app, ["--json", "--outcome", "blocked"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["request_id"] == "req-two"


def test_verify_ok_and_broken(db):
    ok = runner.invoke(audit_app, ["verify", "--db", str(db)])
    assert ok.exit_code == 0, ok.output
    assert "intact: 3 row(s)" in ok.stdout
    parent_option = runner.invoke(audit_app, ["--db", str(db), "verify", "--json"])
    assert parent_option.exit_code == 0 and json.loads(parent_option.stdout)["ok"] is True
    raw = sqlite3.connect(db)
    raw.execute("DROP TRIGGER audit_requests_no_update")
    raw.execute("UPDATE audit_requests SET outcome = 'generated', reasons = '[]' WHERE id = 2")
    raw.commit()
    raw.close()
    broken = runner.invoke(audit_app, ["verify", "--db", str(db)])
    assert broken.exit_code == 1
    assert "broken at row 2" in broken.stdout
    as_json = runner.invoke(audit_app, ["verify", "--db", str(db), "--json"])
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["first_broken"] == 2


def test_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFELATENT_AUDIT_DB", str(tmp_path / "absent.sqlite3"))
    missing = runner.invoke(audit_app, [])
    assert missing.exit_code == 2
    assert "no audit log at" in missing.output and "Traceback" not in missing.output
    assert not (tmp_path / "absent.sqlite3").exists()  # reading never creates the file
    junk = tmp_path / "notes.txt"
    junk.write_text("hello, not a database\n" * 200)
    for args in (["--db", str(junk)], ["verify", "--db", str(junk)]):
        result = runner.invoke(audit_app, args)
        assert result.exit_code == 2, result.output
        assert "not an SQLite database" in result.output and "Traceback" not in result.output
    AuditLog(tmp_path / "ok.sqlite3").close()
    bad_date = runner.invoke(audit_app, ["--db", str(tmp_path / "ok.sqlite3"), "--since", "last tuesday"])
    assert bad_date.exit_code == 2 and "not an ISO 8601" in bad_date.output
    bad_outcome = runner.invoke(audit_app, ["--db", str(tmp_path / "ok.sqlite3"), "--outcome", "weird"])
    assert bad_outcome.exit_code == 2


def test_register_adds_audit_to_an_app(db):
    app = typer.Typer()

    @app.command()
    def version() -> None:
        typer.echo("0")

    register(app)
    result = runner.invoke(app, ["audit", "--db", str(db), "--json", "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["request_id"] == "req-three"
    verified = runner.invoke(app, ["audit", "verify", "--db", str(db)])
    assert verified.exit_code == 0 and "intact" in verified.stdout

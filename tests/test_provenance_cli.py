"""`safelatent verify IMAGE` and `safelatent keys init` through the provenance sub-app (CliRunner), sockets
blocked: text and --json reports, exit statuses, and one-line user errors."""

from __future__ import annotations

import json
import stat

import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers.synthetic_images import encode, natural_image
from safelatent.provenance_cli import provenance_app, register
from safelatent.safety import c2pa_manifest, watermark
from safelatent.safety.c2pa_manifest import GenerationRecord

runner = CliRunner()
PAYLOAD = watermark.WatermarkPayload.for_tag("cli test")


@pytest.fixture(autouse=True)
def _keys_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFELATENT_KEYS_DIR", str(tmp_path / "default-keys"))


@pytest.fixture
def key_dir(tmp_path):
    result = runner.invoke(provenance_app, ["keys", "init", "--dir", str(tmp_path / "keys")])
    assert result.exit_code == 0, result.output
    return tmp_path / "keys"


@pytest.fixture
def signed_png(tmp_path, key_dir):
    path = tmp_path / "marked.png"
    watermark.embed(natural_image(256, seed=21), PAYLOAD).save(path)
    record = GenerationRecord(
        model_hash="feedc0de", adapters=[{"name": "ink", "hash": "0badf00d", "weight": 1}]
    )
    c2pa_manifest.sign_file(path, record, keys_dir=key_dir)
    return path


def test_keys_init_writes_files_with_private_permissions(tmp_path, block_network):
    target = tmp_path / "k"
    result = runner.invoke(provenance_app, ["keys", "init", "--dir", str(target), "--name", "my studio"])
    assert result.exit_code == 0, result.output
    names = {line.rsplit("/", 1)[-1] for line in result.stdout.split()}
    assert names == {"root-ca.pem", "root-ca.key", "signer.pem", "signer.key"}
    assert stat.S_IMODE((target / "signer.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((target / "root-ca.key").stat().st_mode) == 0o600
    again = runner.invoke(provenance_app, ["keys", "init", "--dir", str(target)])
    assert again.exit_code == 2
    assert "already exist" in again.output and "--force" in again.output and "Traceback" not in again.output
    forced = runner.invoke(provenance_app, ["keys", "init", "--dir", str(target), "--force"])
    assert forced.exit_code == 0, forced.output
    assert block_network == []


def test_keys_init_default_folder_comes_from_the_environment(tmp_path):
    result = runner.invoke(provenance_app, ["keys", "init"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "default-keys" / "signer.pem").is_file()


def test_verify_watermarked_and_signed_image(signed_png, key_dir, block_network):
    result = runner.invoke(provenance_app, ["verify", str(signed_png), "--keys-dir", str(key_dir)])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.strip())
    assert lines["watermark"].startswith("found") and f"{PAYLOAD.content_id:06x}" in lines["watermark"]
    assert lines["C2PA"].startswith("trusted") and "trainedAlgorithmicMedia" in lines["C2PA"]
    assert "model feedc0de" in result.stdout and "ink (0badf00d)" in result.stdout
    assert block_network == []


def test_verify_json(signed_png, key_dir, block_network):
    result = runner.invoke(provenance_app, ["verify", str(signed_png), "--json", "--keys-dir", str(key_dir)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["width"] == report["height"] == 256 and report["format"] == "PNG"
    assert report["watermark"]["found"] is True
    assert report["watermark"]["bits"] == "".join(map(str, PAYLOAD.to_bits()))
    assert report["watermark"]["payload"]["content_id"] == f"{PAYLOAD.content_id:06x}"
    assert report["c2pa"]["status"] == "trusted"
    assert report["c2pa"]["created"]["digitalSourceType"].endswith("/trainedAlgorithmicMedia")
    assert report["c2pa"]["generation"]["model_hash"] == "feedc0de"
    assert block_network == []


def test_verify_without_the_trust_anchor_is_untrusted(signed_png, tmp_path):
    result = runner.invoke(provenance_app, ["verify", str(signed_png), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["c2pa"]["status"] == "untrusted"
    trusted = runner.invoke(
        provenance_app,
        ["verify", str(signed_png), "--json", "--trust", str(tmp_path / "keys" / "root-ca.pem")],
    )
    assert json.loads(trusted.stdout)["c2pa"]["status"] == "trusted"


def test_verify_unmarked_image(tmp_path, block_network):
    path = tmp_path / "plain.jpg"
    path.write_bytes(encode(natural_image(256, seed=22), "JPEG", quality=95))
    result = runner.invoke(provenance_app, ["verify", str(path)])
    assert result.exit_code == 0, result.output
    assert "watermark  not found" in result.stdout
    assert "C2PA       absent" in result.stdout
    report = json.loads(runner.invoke(provenance_app, ["verify", str(path), "--json"]).stdout)
    assert report["watermark"]["found"] is False and len(report["watermark"]["bits"]) == 48
    assert report["c2pa"]["status"] == "absent"
    assert block_network == []


def test_verify_small_image_says_why_the_watermark_was_not_checked(tmp_path):
    path = tmp_path / "toy.png"
    Image.new("RGB", (32, 32), "white").save(path)
    result = runner.invoke(provenance_app, ["verify", str(path)])
    assert result.exit_code == 0, result.output
    assert "not checked" in result.stdout and "256×256" in result.stdout


def test_verify_tampered_image_exits_1(signed_png, key_dir):
    data = bytearray(signed_png.read_bytes())
    data[data.index(b"IDAT") + 104] ^= 0xFF
    signed_png.write_bytes(bytes(data))
    result = runner.invoke(provenance_app, ["verify", str(signed_png), "--keys-dir", str(key_dir)])
    assert result.exit_code == 1, result.output
    assert "C2PA       invalid" in result.stdout and "dataHash.mismatch" in result.stdout
    assert "watermark  not checked (pixels cannot be decoded" in result.stdout  # zlib stream broken


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.png", None, "image not found"),
        ("notes.png", b"not an image at all", "cannot read"),
        ("folder", "dir", "is a folder"),
    ],
)
def test_verify_user_errors_are_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    result = runner.invoke(provenance_app, ["verify", str(path)])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert result.output.strip().startswith("error:")


def test_register_adds_the_commands_to_another_app():
    import typer

    app = typer.Typer()

    @app.command()
    def other() -> None:
        """Placeholder so the app is a group."""

    register(app)
    help_text = runner.invoke(app, ["--help"]).output
    assert "verify" in help_text and "keys" in help_text

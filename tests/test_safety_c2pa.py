"""C2PA content credentials, all offline: `keys init` certificates (local CA + ES256 signer, keys 0600),
signing PNG and JPEG, validating against the local trust anchor with sockets blocked, and the
untrusted / tampered / absent cases."""

from __future__ import annotations

import io
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from PIL import Image, PngImagePlugin

from helpers.synthetic_images import encode, natural_image
from safelatent.safety import c2pa_manifest, keys, watermark
from safelatent.safety.c2pa_manifest import DIGITAL_SOURCE_TYPE, GENERATION_LABEL, GenerationRecord
from safelatent.safety.keys import ProvenanceError

RECORD = GenerationRecord(
    model_hash="3f2a9c01",
    adapters=[{"name": "watercolour", "hash": "a1b2c3d4", "weight": 0.8}],
    extra={"seed": 7},
)


@pytest.fixture(autouse=True)
def _no_default_keys(tmp_path, monkeypatch):
    """Never read or write the user's real key folder."""
    monkeypatch.setenv("SAFELATENT_KEYS_DIR", str(tmp_path / "default-keys"))


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    return keys.init_keys(tmp_path_factory.mktemp("keys") / "k").directory


@pytest.fixture(scope="module")
def other_key_dir(tmp_path_factory):
    return keys.init_keys(tmp_path_factory.mktemp("keys") / "other", common_name="someone else").directory


@pytest.fixture(scope="module")
def png_bytes():
    return encode(natural_image(256, seed=11), "PNG")


@pytest.fixture(scope="module")
def jpeg_bytes():
    return encode(natural_image(256, seed=12), "JPEG", quality=95)


def _tamper(data: bytes) -> bytes:
    """Flip one byte of pixel data (inside the first PNG IDAT chunk, or in a JPEG's entropy-coded scan)."""
    out = bytearray(data)
    index = out.index(b"IDAT") + 4 + 100 if data.startswith(b"\x89PNG") else len(out) - 200
    out[index] ^= 0xFF
    return bytes(out)


def test_key_files_and_permissions(key_dir):
    paths = keys.KeyPaths(key_dir)
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    for private in (paths.root_key, paths.signer_key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    root = x509.load_pem_x509_certificate(paths.root_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(paths.signer_cert.read_bytes())
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert root.issuer == root.subject
    assert leaf.issuer == root.subject and leaf.subject != root.subject
    leaf.verify_directly_issued_by(root)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    ekus = list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert ExtendedKeyUsageOID.EMAIL_PROTECTION in ekus
    assert x509.ObjectIdentifier(keys.DOCUMENT_SIGNING_OID) in ekus
    assert leaf.signature_hash_algorithm.name == "sha256"
    assert leaf.public_key().curve.name == "secp256r1"


def test_init_refuses_to_overwrite(tmp_path):
    first = keys.init_keys(tmp_path / "k")
    before = first.signer_cert.read_bytes()
    with pytest.raises(ProvenanceError, match=r"already exist.*--force"):
        keys.init_keys(tmp_path / "k")
    keys.init_keys(tmp_path / "k", force=True)
    assert first.signer_cert.read_bytes() != before


def test_private_key_files_are_0600_even_with_a_lax_umask(tmp_path):
    import os

    old = os.umask(0)
    try:
        paths = keys.init_keys(tmp_path / "k")
    finally:
        os.umask(old)
    assert stat.S_IMODE(paths.signer_key.stat().st_mode) == 0o600


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_sign_and_validate_offline(fmt, key_dir, png_bytes, jpeg_bytes, block_network):
    data = {"png": png_bytes, "jpeg": jpeg_bytes}.get(fmt) or encode(natural_image(256, 14), "WEBP")
    assert c2pa_manifest.read_manifest(data, keys_dir=key_dir).status == "absent"
    signed = c2pa_manifest.sign_bytes(data, RECORD, keys_dir=key_dir, title=f"image.{fmt}")
    report = c2pa_manifest.read_manifest(signed, keys_dir=key_dir)
    assert report.status == "trusted", report
    assert report.validation_state == "Trusted" and report.failures == []
    assert report.created["action"] == "c2pa.created"
    assert report.created["digitalSourceType"] == DIGITAL_SOURCE_TYPE
    assert report.created["softwareAgent"]["name"] == "safelatent"
    assert report.generation["model_hash"] == "3f2a9c01"
    assert report.generation["adapters"] == [{"name": "watercolour", "hash": "a1b2c3d4", "weight": 0.8}]
    assert report.generation["seed"] == 7
    assert report.signer["common_name"] == "safelatent local signer"
    assert report.claim_generator.startswith("safelatent")
    assert report.title == f"image.{fmt}"
    assert Image.open(io.BytesIO(signed)).size == (256, 256)  # still an ordinary image
    assert block_network == []


def test_generation_assertion_label(key_dir, png_bytes):
    import c2pa

    signed = c2pa_manifest.sign_bytes(png_bytes, RECORD, keys_dir=key_dir)
    with c2pa.Reader("image/png", io.BytesIO(signed)) as reader:
        manifest = reader.get_active_manifest()
    labels = [a["label"] for a in manifest["assertions"]]
    assert GENERATION_LABEL in labels and any(label.startswith("c2pa.actions") for label in labels)
    assert manifest.get("thumbnail") is None  # thumbnails are switched off: smaller files


def test_other_root_is_untrusted(key_dir, other_key_dir, png_bytes, block_network):
    signed = c2pa_manifest.sign_bytes(png_bytes, RECORD, keys_dir=other_key_dir)
    report = c2pa_manifest.read_manifest(signed, keys_dir=key_dir)
    assert report.status == "untrusted"
    assert [f["code"] for f in report.failures] == ["signingCredential.untrusted"]
    trusted = c2pa_manifest.read_manifest(
        signed, keys_dir=key_dir, trust_anchors=keys.KeyPaths(other_key_dir).root_cert.read_bytes()
    )
    assert trusted.status == "trusted"
    assert block_network == []


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_tampered_image_fails_validation(fmt, key_dir, png_bytes, jpeg_bytes, block_network):
    data = png_bytes if fmt == "png" else jpeg_bytes
    signed = c2pa_manifest.sign_bytes(data, RECORD, keys_dir=key_dir)
    report = c2pa_manifest.read_manifest(_tamper(signed), keys_dir=key_dir)
    assert report.status == "invalid"
    assert any("dataHash.mismatch" in f["code"] for f in report.failures), report.failures
    assert "invalid" in report.summary()
    assert block_network == []


def test_reencoding_drops_the_manifest(key_dir, png_bytes):
    signed = c2pa_manifest.sign_bytes(png_bytes, RECORD, keys_dir=key_dir)
    reencoded = encode(Image.open(io.BytesIO(signed)), "PNG")
    assert c2pa_manifest.read_manifest(reencoded, keys_dir=key_dir).status == "absent"


def test_not_an_image_is_unsupported(key_dir):
    assert c2pa_manifest.read_manifest(b"hello", keys_dir=key_dir).status == "unsupported"
    with pytest.raises(ProvenanceError, match="not a PNG, JPEG or WebP"):
        c2pa_manifest.sign_bytes(b"hello", RECORD, keys_dir=key_dir)


def test_missing_keys_say_what_to_run(tmp_path, png_bytes):
    with pytest.raises(ProvenanceError, match="keys init"):
        c2pa_manifest.sign_bytes(png_bytes, RECORD, keys_dir=tmp_path / "nowhere")


def test_group_readable_signer_key_is_refused(tmp_path, png_bytes):
    paths = keys.init_keys(tmp_path / "k")
    paths.signer_key.chmod(0o640)
    with pytest.raises(ProvenanceError, match="chmod 600"):
        c2pa_manifest.sign_bytes(png_bytes, RECORD, keys_dir=paths.directory)


def test_sign_file_keeps_png_text_and_watermark(tmp_path, key_dir, block_network):
    """The order a generator uses: watermark the pixels, save the PNG (with its parameters text), sign."""
    payload = watermark.WatermarkPayload.for_tag("3f2a9c01:7")
    marked = watermark.embed(natural_image(256, seed=13), payload)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a lighthouse, Steps: 20")
    path = tmp_path / "00000-7.png"
    marked.save(path, pnginfo=info)
    assert c2pa_manifest.sign_file(path, RECORD, keys_dir=key_dir) == path
    assert not list(tmp_path.glob(".*.tmp"))
    reopened = Image.open(path)
    assert reopened.text["parameters"] == "a lighthouse, Steps: 20"
    assert watermark.verify(reopened).payload == payload
    assert c2pa_manifest.read_manifest(path, keys_dir=key_dir).status == "trusted"
    assert block_network == []


def test_sign_file_missing_source(tmp_path, key_dir):
    with pytest.raises(ProvenanceError, match="image not found"):
        c2pa_manifest.sign_file(tmp_path / "missing.png", RECORD, keys_dir=key_dir)
    with pytest.raises(ProvenanceError, match="image not found"):
        c2pa_manifest.read_manifest(tmp_path / "missing.png")

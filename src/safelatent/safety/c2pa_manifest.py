"""C2PA content credentials, signed and verified offline with ``c2pa-python`` and local keys.

Each signed image carries one manifest with two assertions:

``c2pa.actions``
    one ``c2pa.created`` action, ``digitalSourceType`` = IPTC ``trainedAlgorithmicMedia``
    (:data:`DIGITAL_SOURCE_TYPE`), ``softwareAgent`` = safelatent and its version.
``org.safelatent.generation`` (:data:`GENERATION_LABEL`)
    ``{"model_hash": ..., "adapters": [{"name", "hash", "weight"}, ...], ...extra}`` — which weights made
    the image (see :class:`GenerationRecord`); no prompt text unless the caller puts it in ``extra``.

Signing uses the signer certificate and key from :mod:`safelatent.safety.keys` (ES256) with no
time-stamp authority, so nothing is fetched. Verifying builds a ``c2pa.Context`` whose settings trust
the local root certificate (``trust.user_anchors``) and switch off every fetch the SDK knows
(``verify.ocsp_fetch``, ``verify.remote_manifest_fetch``). The result (:class:`ManifestReport`) is
``absent``, ``trusted`` (valid and chained to a trusted anchor), ``untrusted`` (intact and correctly
signed, but by a certificate no configured anchor vouches for), ``invalid`` (the image or manifest was
altered, or the signature does not verify) or ``unsupported`` (a format C2PA cannot carry).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .. import __version__
from .keys import ProvenanceError, load_signing_material, load_trust_anchor

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
GENERATION_LABEL = "org.safelatent.generation"
CLAIM_GENERATOR = "safelatent"

Status = Literal["absent", "trusted", "untrusted", "invalid", "unsupported"]

_MAGIC_MIME = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
)


def sniff_mime(data: bytes) -> str | None:
    """The MIME type of an image from its first bytes (PNG, JPEG, WebP), or ``None``."""
    for magic, mime in _MAGIC_MIME:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


@dataclass
class GenerationRecord:
    """The content of the ``org.safelatent.generation`` assertion."""

    model_hash: str | None = None
    adapters: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_assertion(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "generator": f"{CLAIM_GENERATOR} {__version__}",
            "model_hash": self.model_hash,
            "adapters": [dict(a) for a in self.adapters],
        }
        for key, value in self.extra.items():
            data.setdefault(key, value)
        return data


def build_manifest(record: GenerationRecord, *, title: str, mime: str) -> dict[str, Any]:
    """The manifest definition handed to ``c2pa.Builder``."""
    return {
        "claim_generator_info": [{"name": CLAIM_GENERATOR, "version": __version__}],
        "title": title,
        "format": mime,
        "assertions": [
            {
                "label": "c2pa.actions",
                "data": {
                    "actions": [
                        {
                            "action": "c2pa.created",
                            "digitalSourceType": DIGITAL_SOURCE_TYPE,
                            "softwareAgent": {"name": CLAIM_GENERATOR, "version": __version__},
                        }
                    ]
                },
            },
            {"label": GENERATION_LABEL, "data": record.to_assertion()},
        ],
    }


def _settings(trust_anchors_pem: str | None) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "version": 1,
        "verify": {"verify_trust": True, "ocsp_fetch": False, "remote_manifest_fetch": False},
        "builder": {"thumbnail": {"enabled": False}},
    }
    if trust_anchors_pem:
        settings["trust"] = {"user_anchors": trust_anchors_pem}
    return settings


def _context(trust_anchors_pem: str | None):
    import c2pa

    try:
        return c2pa.Context.from_dict(_settings(trust_anchors_pem))
    except c2pa.C2paError as error:
        raise ProvenanceError(
            f"C2PA rejected the trust settings: {error}", "check that the trust anchors are PEM certificates"
        ) from None


def sign_bytes(
    data: bytes,
    record: GenerationRecord,
    *,
    keys_dir: Path | str | None = None,
    title: str = "image",
    mime: str | None = None,
) -> bytes:
    """Return ``data`` (a PNG, JPEG or WebP file's bytes) with a signed C2PA manifest embedded."""
    import c2pa

    mime = mime or sniff_mime(data)
    if mime is None:
        raise ProvenanceError(
            f"cannot sign {title}: not a PNG, JPEG or WebP file", "save the image as PNG or JPEG first"
        )
    material = load_signing_material(keys_dir)
    context = _context(material.trust_anchor_pem.decode())
    try:
        signer = c2pa.Signer.from_info(
            c2pa.C2paSignerInfo(
                c2pa.C2paSigningAlg.ES256, material.cert_chain_pem, material.private_key_pem, None
            )
        )
    except c2pa.C2paError as error:
        raise ProvenanceError(
            f"C2PA rejected the signing key or certificate in {material.directory}: {error}",
            "recreate them with `safelatent keys init --force`",
        ) from None
    out = io.BytesIO()
    try:
        with signer, c2pa.Builder(build_manifest(record, title=title, mime=mime), context=context) as builder:
            builder.sign(signer, mime, io.BytesIO(data), out)
    except c2pa.C2paError as error:
        raise ProvenanceError(f"C2PA signing of {title} failed: {error}") from None
    finally:
        context.close()
    return out.getvalue()


def sign_file(
    source: Path | str,
    record: GenerationRecord,
    *,
    dest: Path | str | None = None,
    keys_dir: Path | str | None = None,
) -> Path:
    """Sign ``source`` into ``dest`` (default: replace ``source`` atomically). Returns the written path."""
    source = Path(source)
    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise ProvenanceError(f"image not found: {source}") from None
    except OSError as error:
        raise ProvenanceError(f"cannot read {source}: {error.strerror}") from None
    signed = sign_bytes(data, record, keys_dir=keys_dir, title=source.name)
    target = Path(dest) if dest is not None else source
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(signed)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


@dataclass
class ManifestReport:
    """What :func:`read_manifest` found in an image."""

    status: Status
    validation_state: str | None = None
    failures: list[dict[str, str]] = field(default_factory=list)
    title: str | None = None
    claim_generator: str | None = None
    signer: dict[str, Any] | None = None
    created: dict[str, Any] | None = None
    generation: dict[str, Any] | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for people."""
        if self.status in ("absent", "unsupported"):
            return self.status + (f" ({self.reason})" if self.reason else "")
        who = ""
        if self.signer:
            who = f", signed by {self.signer.get('common_name')!r} (issuer {self.signer.get('issuer')!r})"
        what = ""
        if self.created:
            source = str(self.created.get("digitalSourceType", "")).rsplit("/", 1)[-1]
            what = f", c2pa.created ({source or 'no digitalSourceType'})"
        by = f", by {self.claim_generator}" if self.claim_generator else ""
        why = ""
        if self.failures:
            why = " — " + "; ".join(f"{f['code']}: {f['explanation']}" for f in self.failures[:3])
        return f"{self.status}{who}{what}{by}{why}"


def _failures(results: dict | None) -> list[dict[str, str]]:
    failures = []
    for part in ("activeManifest",):
        for item in ((results or {}).get(part) or {}).get("failure", []) or []:
            failures.append({"code": item.get("code", "?"), "explanation": item.get("explanation", "")})
    return failures


def _describe(manifest: dict[str, Any]) -> dict[str, Any]:
    created = generation = None
    for assertion in manifest.get("assertions", []) or []:
        label = assertion.get("label", "")
        if label.startswith("c2pa.actions"):
            for action in (assertion.get("data") or {}).get("actions", []) or []:
                if action.get("action") == "c2pa.created" and created is None:
                    created = action
        elif label == GENERATION_LABEL:
            generation = assertion.get("data")
    generator = None
    info = manifest.get("claim_generator_info") or []
    if info:
        generator = " ".join(str(info[0].get(k)) for k in ("name", "version") if info[0].get(k))
    return {
        "title": manifest.get("title"),
        "claim_generator": generator or manifest.get("claim_generator"),
        "signer": manifest.get("signature_info"),
        "created": created,
        "generation": generation,
    }


def read_manifest(
    source: Path | str | bytes,
    *,
    trust_anchors: bytes | str | None = None,
    keys_dir: Path | str | None = None,
) -> ManifestReport:
    """Read and validate the C2PA manifest of an image file (path) or its bytes, offline.

    Trust anchors: ``trust_anchors`` (PEM) plus the root certificate of ``keys_dir`` (default key folder)
    when it has one. Never raises for a missing, broken or untrusted manifest — that is the report.
    """
    import c2pa

    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise ProvenanceError(f"image not found: {source}") from None
        except OSError as error:
            raise ProvenanceError(f"cannot read {source}: {error.strerror}") from None
    mime = sniff_mime(data)
    if mime is None:
        return ManifestReport(status="unsupported", reason="not a PNG, JPEG or WebP file")
    anchors = [a.decode() if isinstance(a, bytes) else a for a in (trust_anchors,) if a]
    local = load_trust_anchor(keys_dir)
    if local:
        anchors.append(local.decode())
    context = _context("\n".join(anchors) or None)
    try:
        try:
            reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, context)
        except c2pa.C2paError as error:
            return ManifestReport(status="invalid", reason=f"manifest cannot be read: {error}")
        if reader is None:
            return ManifestReport(status="absent", reason="no C2PA manifest in the image")
        with reader:
            store = json.loads(reader.json())
            state = store.get("validation_state")
            failures = _failures(store.get("validation_results"))
            manifest = (store.get("manifests") or {}).get(store.get("active_manifest") or "", {})
    finally:
        context.close()
    status: Status
    if state == "Trusted":
        status = "trusted"
    elif state == "Valid":
        status = "untrusted"
        failures = [f for f in failures if f["code"].startswith("signingCredential.")] or failures
    else:
        status = "invalid"
    return ManifestReport(status=status, validation_state=state, failures=failures, **_describe(manifest))

"""Local signing keys for C2PA content credentials: a private certificate authority and one signer.

``safelatent keys init`` (:func:`init_keys`) writes, into one folder (default :func:`default_keys_dir`)::

    root-ca.pem    self-signed root certificate (CA:true, keyCertSign) — the trust anchor that
                   ``safelatent verify`` (and any C2PA reader told to trust it) validates against
    root-ca.key    its P-256 private key (PKCS#8, 0600) — only needed to issue a new signer
    signer.pem     the signer certificate issued by the root: ES256 / P-256, digitalSignature key usage,
                   extendedKeyUsage emailProtection + documentSigning (C2PA rejects a bare self-signed
                   leaf and a leaf without one of its accepted EKUs)
    signer.key     its private key (PKCS#8, 0600)

Private keys are created with mode 0600 inside a 0700 folder and are refused when group or others can
read them. Nothing here touches the network; the certificates carry no OCSP or CRL addresses.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import SafelatentError

#: The signer certificate's extended key usages: C2PA's certificate profile accepts emailProtection and
#: documentSigning (1.3.6.1.5.5.7.3.36) for claim signers; anyExtendedKeyUsage is forbidden.
DOCUMENT_SIGNING_OID = "1.3.6.1.5.5.7.3.36"

ROOT_CERT = "root-ca.pem"
ROOT_KEY = "root-ca.key"
SIGNER_CERT = "signer.pem"
SIGNER_KEY = "signer.key"


class ProvenanceError(SafelatentError):
    """Watermarking, signing or verifying provenance failed: missing or unsafe keys, an unreadable or
    too-small image, a manifest that cannot be written."""


def default_keys_dir() -> Path:
    """``$SAFELATENT_KEYS_DIR``, else ``$XDG_CONFIG_HOME/safelatent/keys`` (``~/.config/safelatent/keys``)."""
    env = os.environ.get("SAFELATENT_KEYS_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "safelatent" / "keys"


@dataclass(frozen=True)
class KeyPaths:
    """Where the four files of a key folder live."""

    directory: Path

    @property
    def root_cert(self) -> Path:
        return self.directory / ROOT_CERT

    @property
    def root_key(self) -> Path:
        return self.directory / ROOT_KEY

    @property
    def signer_cert(self) -> Path:
        return self.directory / SIGNER_CERT

    @property
    def signer_key(self) -> Path:
        return self.directory / SIGNER_KEY

    def all(self) -> list[Path]:
        return [self.root_cert, self.root_key, self.signer_cert, self.signer_key]


@dataclass(frozen=True)
class SigningMaterial:
    """What a C2PA signer needs: the certificate chain (signer first, PEM), its private key and the
    trust anchor (root certificate, PEM) that verifiers should trust."""

    cert_chain_pem: bytes
    private_key_pem: bytes
    trust_anchor_pem: bytes
    directory: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file created with mode 0600 (never world-readable, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is masked by the umask; an existing file keeps its own
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o644)


def init_keys(
    directory: Path | str | None = None,
    *,
    common_name: str = "safelatent local signer",
    organization: str = "safelatent (local)",
    valid_days: int = 825,
    force: bool = False,
) -> KeyPaths:
    """Create a local root CA and a signer certificate issued by it (ES256, P-256) in ``directory``.

    Refuses to overwrite an existing key folder unless ``force`` (a new root invalidates the trust of
    every image signed with the old one). Returns the paths written.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

    paths = KeyPaths(Path(directory).expanduser() if directory is not None else default_keys_dir())
    existing = [p for p in paths.all() if p.exists()]
    if existing and not force:
        raise ProvenanceError(
            f"signing keys already exist in {paths.directory} ({', '.join(p.name for p in existing)})",
            "keep them, or pass --force to replace them (images signed with the old root stop validating"
            " against the new one)",
        )
    if valid_days < 1:
        raise ProvenanceError(f"valid_days must be at least 1, got {valid_days}")
    try:
        paths.directory.mkdir(parents=True, exist_ok=True)
        paths.directory.chmod(0o700)
    except OSError as error:
        raise ProvenanceError(
            f"cannot create the key folder {paths.directory}: {error.strerror}", "choose another --dir"
        ) from None

    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(minutes=5)  # tolerate small clock differences between signer and reader

    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{organization} root CA"),
        ]
    )
    root = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + dt.timedelta(days=max(valid_days, 3650)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )

    signer_key = ec.generate_private_key(ec.SECP256R1())
    signer = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(root_name)
        .public_key(signer_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.EMAIL_PROTECTION, ObjectIdentifier(DOCUMENT_SIGNING_OID)]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(signer_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False
        )
        .sign(root_key, hashes.SHA256())
    )

    def key_pem(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    _write_private(paths.root_key, key_pem(root_key))
    _write_private(paths.signer_key, key_pem(signer_key))
    _write_public(paths.root_cert, root.public_bytes(serialization.Encoding.PEM))
    _write_public(paths.signer_cert, signer.public_bytes(serialization.Encoding.PEM))
    return paths


def _read(path: Path, what: str, directory: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ProvenanceError(
            f"{what} not found: {path}", f"run `safelatent keys init --dir {directory}` first"
        ) from None
    except OSError as error:
        raise ProvenanceError(f"cannot read {what} {path}: {error.strerror}") from None


def _check_private(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ProvenanceError(
            f"private key {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o})",
            f"run `chmod 600 {path}`",
        )


def load_trust_anchor(directory: Path | str | None = None) -> bytes | None:
    """The root certificate (PEM) of a key folder, or ``None`` when the folder has none."""
    paths = KeyPaths(Path(directory).expanduser() if directory is not None else default_keys_dir())
    try:
        return paths.root_cert.read_bytes()
    except OSError:
        return None


def load_signing_material(directory: Path | str | None = None) -> SigningMaterial:
    """Read the signer certificate, its key (refused if group/world-accessible) and the trust anchor."""
    paths = KeyPaths(Path(directory).expanduser() if directory is not None else default_keys_dir())
    cert = _read(paths.signer_cert, "signer certificate", paths.directory)
    key = _read(paths.signer_key, "signer private key", paths.directory)
    anchor = _read(paths.root_cert, "root certificate", paths.directory)
    _check_private(paths.signer_key)
    return SigningMaterial(
        cert_chain_pem=cert, private_key_pem=key, trust_anchor_pem=anchor, directory=paths.directory
    )

"""Adapter identity: the content hash that PNG ``parameters`` and sidecars record for each LoRA.

For ``.safetensors`` this is AUTOMATIC1111's "autov3" LoRA hash (``addnet_hash_safetensors`` in A1111's
``modules/hashes.py``): SHA-256 over the file bytes *after* the header — the 8-byte little-endian header
length and the JSON header are skipped — so editing metadata (a trigger word, a description) keeps the
hash, while any change to a tensor changes it. A1111, Civitai and others print its first 12 hex digits in
``Lora hashes: "name: 0123456789ab"``. Other files (``.pt``/``.bin``) are hashed whole.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

__all__ = ["SHORT_HASH_LENGTH", "lora_hash", "lora_sha256"]

#: Hex digits A1111 writes for a LoRA hash.
SHORT_HASH_LENGTH = 12
_CHUNK = 1024 * 1024


def lora_sha256(path: str | Path) -> str:
    """Full hex SHA-256: of the bytes after the safetensors header, or of the whole file otherwise."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if path.suffix.lower() == ".safetensors":
            size_bytes = handle.read(8)
            if len(size_bytes) == 8:
                (header_size,) = struct.unpack("<Q", size_bytes)
                handle.seek(8 + header_size)
            else:
                handle.seek(0)
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def lora_hash(path: str | Path) -> str:
    """The short (12 hex digit) hash A1111 prints in ``Lora hashes``."""
    return lora_sha256(path)[:SHORT_HASH_LENGTH]

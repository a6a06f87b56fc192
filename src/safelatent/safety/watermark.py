"""Invisible watermark: a 48-bit payload hidden in the image's chroma with ``invisible-watermark``.

Payload (48 bits, written most significant bit first)::

    bits  0-7   magic     0x53 (ASCII "S", safelatent)
    bits  8-11  version   1
    bits 12-15  flags     0b1000 = AI-generated (always set); the three low bits are reserved (0)
    bits 16-39  id        24-bit content id: the first 3 bytes of SHA-256(tag), ``tag`` chosen by the
                          caller (e.g. the model hash and seed) — links the pixels to a record elsewhere
    bits 40-47  crc       CRC-8 (polynomial 0x07, init 0x00, xor-out 0x55: CRC-8/I-432-1) of bytes 0-4

A read counts as "found" only when the magic, version, flags and CRC all match: 24 fixed or checked
bits, so a random read is accepted with probability 2**-24 (about 6e-8); the all-zero and all-one reads
that flat images give fail the magic.

Method. The embedder is ``imwatermark``'s ``dwtDctSvd`` (Haar DWT of the U channel, 4×4 DCT blocks,
the bit in each block's largest singular value), not ``dwtDct``: measured on smooth procedural images,
``dwtDct`` (which quantises the largest raw coefficient of each block, a position that moves after
embedding in flat regions) read 7-16 of 48 bits wrong even from lossless PNG, while ``dwtDctSvd`` read
all 48 from PNG and from JPEG quality 95 (at 256×256 and 512×512; a few errors at quality 85). PSNR is
about 40 dB for both. :func:`verify` also tries ``dwtDct``, so images marked with it are still read.

The library works on BGR ``uint8`` arrays (OpenCV order); :func:`embed` converts from PIL RGB and back
and keeps an alpha channel untouched. It needs at least 256×256 pixels (by area): smaller images, such as
the toy model's 32×32 outputs, cannot carry the mark — :func:`embed` raises :class:`ProvenanceError`
(check first with :func:`unsupported_reason`) and :func:`verify` reports ``checked=False`` with the
reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from PIL import Image

from .keys import ProvenanceError

MAGIC = 0x53
VERSION = 1
FLAG_AI_GENERATED = 0b1000
PAYLOAD_BITS = 48
MIN_PIXELS = 256 * 256
DEFAULT_METHOD = "dwtDctSvd"
Method = Literal["dwtDctSvd", "dwtDct"]
#: The order :func:`verify` tries the embedding methods in.
READ_METHODS: tuple[Method, ...] = ("dwtDctSvd", "dwtDct")


def crc8(data: bytes) -> int:
    """CRC-8/I-432-1: polynomial 0x07, init 0x00, no reflection, xor-out 0x55."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc ^ 0x55


def content_id(tag: str | bytes) -> int:
    """The 24-bit id for ``tag``: the first 3 bytes of its SHA-256 (UTF-8 for text)."""
    data = tag.encode() if isinstance(tag, str) else bytes(tag)
    return int.from_bytes(hashlib.sha256(data).digest()[:3], "big")


@dataclass(frozen=True)
class WatermarkPayload:
    """The decoded fields of a valid payload."""

    content_id: int
    version: int = VERSION
    ai_generated: bool = True

    @classmethod
    def for_tag(cls, tag: str | bytes) -> WatermarkPayload:
        """A version-1, AI-generated payload whose id is :func:`content_id` of ``tag``."""
        return cls(content_id=content_id(tag))

    def to_bytes(self) -> bytes:
        if not 0 <= self.content_id < 1 << 24:
            raise ProvenanceError(f"watermark content id {self.content_id} does not fit in 24 bits")
        flags = FLAG_AI_GENERATED if self.ai_generated else 0
        head = bytes([MAGIC, (self.version & 0xF) << 4 | flags]) + self.content_id.to_bytes(3, "big")
        return head + bytes([crc8(head)])

    def to_bits(self) -> list[int]:
        return [int(b) for b in np.unpackbits(np.frombuffer(self.to_bytes(), dtype=np.uint8))]

    @classmethod
    def from_bits(cls, bits) -> WatermarkPayload | None:
        """Parse 48 bits; ``None`` unless magic, version, flags and CRC are all right."""
        bits = [int(b) for b in bits]
        if len(bits) != PAYLOAD_BITS:
            return None
        data = np.packbits(np.array(bits, dtype=np.uint8)).tobytes()
        if data[0] != MAGIC or data[1] >> 4 != VERSION or data[1] & 0xF != FLAG_AI_GENERATED:
            return None
        if crc8(data[:5]) != data[5]:
            return None
        return cls(content_id=int.from_bytes(data[2:5], "big"), version=VERSION, ai_generated=True)


@dataclass
class WatermarkReport:
    """What :func:`verify` found. ``bits`` is the raw read of the first method tried (or of the method
    that found the payload); ``reason`` explains a ``checked=False`` or ``found=False`` result."""

    checked: bool
    found: bool
    bits: str | None = None
    payload: WatermarkPayload | None = None
    method: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.payload is not None:
            out["payload"] = {
                "version": self.payload.version,
                "ai_generated": self.payload.ai_generated,
                "content_id": f"{self.payload.content_id:06x}",
            }
        return out

    def summary(self) -> str:
        """One line for people."""
        if not self.checked:
            return f"not checked ({self.reason})"
        if not self.found:
            return f"not found (read {self.bits})"
        assert self.payload is not None
        return (
            f"found: safelatent v{self.payload.version}, AI-generated, id {self.payload.content_id:06x}"
            f" ({self.method}, bits {self.bits})"
        )


def unsupported_reason(image: Image.Image) -> str | None:
    """Why ``image`` cannot carry (or be read for) a watermark, or ``None`` if it can."""
    width, height = image.size
    if width * height < MIN_PIXELS or min(width, height) < 16:
        return (
            f"image is {width}×{height}; the invisible watermark needs at least 256×256 pixels"
            " (65 536 by area, each side at least 16)"
        )
    return None


def _to_bgr(image: Image.Image) -> tuple[np.ndarray, Image.Image | None]:
    """PIL image → contiguous BGR uint8 array, plus its alpha band (or ``None``)."""
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb[..., ::-1]), alpha


def embed(
    image: Image.Image, payload: WatermarkPayload | str | bytes, *, method: Method = DEFAULT_METHOD
) -> Image.Image:
    """Return a watermarked copy of ``image`` (RGB, or RGBA with the alpha kept) carrying ``payload``.

    ``payload`` may be a :class:`WatermarkPayload` or a tag (see :meth:`WatermarkPayload.for_tag`).
    Raises :class:`ProvenanceError` for images smaller than 256×256 pixels.
    """
    from imwatermark import WatermarkEncoder

    if method not in READ_METHODS:
        raise ProvenanceError(f"unknown watermark method {method!r}", f"use one of {', '.join(READ_METHODS)}")
    reason = unsupported_reason(image)
    if reason is not None:
        raise ProvenanceError(
            f"cannot watermark: {reason}", "generate at 256×256 or larger, or skip the watermark"
        )
    if not isinstance(payload, WatermarkPayload):
        payload = WatermarkPayload.for_tag(payload)
    bgr, alpha = _to_bgr(image)
    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", payload.to_bits())
    marked = encoder.encode(bgr, method)
    rgb = np.clip(np.rint(marked[..., ::-1]), 0, 255).astype(np.uint8)
    out = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    if alpha is not None:
        out.putalpha(alpha)
    return out


def read_bits(image: Image.Image, method: Method = DEFAULT_METHOD) -> list[int]:
    """The 48 raw bits ``method`` reads from ``image`` (whether or not a payload is there)."""
    from imwatermark import WatermarkDecoder

    reason = unsupported_reason(image)
    if reason is not None:
        raise ProvenanceError(f"cannot read a watermark: {reason}")
    bgr, _ = _to_bgr(image)
    return [int(b) for b in WatermarkDecoder("bits", PAYLOAD_BITS).decode(bgr, method)]


def verify(image: Image.Image) -> WatermarkReport:
    """Look for a safelatent payload with each method in :data:`READ_METHODS`; never raises for images
    that are merely unmarked or too small (see :class:`WatermarkReport`)."""
    reason = unsupported_reason(image)
    if reason is not None:
        return WatermarkReport(checked=False, found=False, reason=reason)
    first: str | None = None
    for method in READ_METHODS:
        bits = read_bits(image, method)
        text = "".join(map(str, bits))
        first = first or text
        payload = WatermarkPayload.from_bits(bits)
        if payload is not None:
            return WatermarkReport(checked=True, found=True, bits=text, payload=payload, method=method)
    return WatermarkReport(
        checked=True, found=False, bits=first, reason="no valid safelatent payload (magic/CRC mismatch)"
    )

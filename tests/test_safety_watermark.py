"""Invisible watermark: the 48-bit payload layout, embedding and reading back from PNG and JPEG q95,
"not found" on unmarked images, and the size limit (the toy model's 32×32 images cannot carry it)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from helpers.synthetic_images import encode, natural_image, textured_image
from safelatent.safety import watermark
from safelatent.safety.keys import ProvenanceError
from safelatent.safety.watermark import PAYLOAD_BITS, WatermarkPayload, crc8

PAYLOAD = WatermarkPayload.for_tag("model 3f2a… seed 7")


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_payload_layout():
    data = PAYLOAD.to_bytes()
    assert len(data) * 8 == PAYLOAD_BITS == len(PAYLOAD.to_bits())
    assert data[0] == 0x53  # magic "S"
    assert data[1] == 0x18  # version 1, flags 0b1000 (AI-generated)
    assert (
        int.from_bytes(data[2:5], "big") == PAYLOAD.content_id == watermark.content_id("model 3f2a… seed 7")
    )
    assert data[5] == crc8(data[:5])
    assert WatermarkPayload.from_bits(PAYLOAD.to_bits()) == PAYLOAD


def test_crc8_check_value():
    assert crc8(b"123456789") == 0xA1  # CRC-8/I-432-1 catalogue check value


def test_every_single_bit_flip_is_rejected():
    bits = PAYLOAD.to_bits()
    for i in range(PAYLOAD_BITS):
        flipped = list(bits)
        flipped[i] ^= 1
        assert WatermarkPayload.from_bits(flipped) is None, i


def test_random_bits_are_not_accepted():
    rng = np.random.default_rng(0)
    reads = rng.integers(0, 2, size=(20_000, PAYLOAD_BITS))
    assert not any(WatermarkPayload.from_bits(r) for r in reads)
    assert WatermarkPayload.from_bits([0] * PAYLOAD_BITS) is None
    assert WatermarkPayload.from_bits([1] * PAYLOAD_BITS) is None
    assert WatermarkPayload.from_bits([0] * 32) is None


@pytest.mark.parametrize(
    ("size", "fmt", "options"),
    [(256, "PNG", {}), (256, "JPEG", {"quality": 95}), (512, "JPEG", {"quality": 95})],
)
def test_embed_and_read_back(size, fmt, options):
    original = natural_image(size, seed=size)
    marked = watermark.embed(original, PAYLOAD)
    assert marked.size == original.size and marked.mode == "RGB"
    report = watermark.verify(_decode(encode(marked, fmt, **options)))
    assert report.checked and report.found, report
    assert report.payload == PAYLOAD
    assert report.bits == "".join(map(str, PAYLOAD.to_bits()))
    assert "found" in report.summary() and f"{PAYLOAD.content_id:06x}" in report.summary()


def test_embed_keeps_colours_in_rgb_order():
    """A BGR/RGB mix-up would swap red and blue: the marked image must stay close to the original."""
    original = natural_image(256, seed=1)
    marked = watermark.embed(original, "tag")
    before, after = np.asarray(original, dtype=float), np.asarray(marked, dtype=float)
    psnr = 10 * np.log10(255**2 / np.mean((after - before) ** 2))
    assert psnr > 35, psnr  # measured ~40 dB
    swapped = before[..., ::-1]
    assert 10 * np.log10(255**2 / np.mean((swapped - before) ** 2)) < 25  # what a channel swap costs
    assert watermark.verify(marked).found


def test_alpha_channel_is_kept():
    rgba = natural_image(256, seed=3).convert("RGBA")
    alpha = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (256, 1)), "L")
    rgba.putalpha(alpha)
    marked = watermark.embed(rgba, PAYLOAD)
    assert marked.mode == "RGBA"
    assert np.array_equal(np.asarray(marked.getchannel("A")), np.asarray(alpha))
    assert watermark.verify(_decode(encode(marked, "PNG"))).payload == PAYLOAD


@pytest.mark.parametrize("make", [natural_image, textured_image])
def test_unmarked_images_report_not_found(make):
    for seed in range(4):
        report = watermark.verify(make(256, seed=100 + seed))
        assert report.checked and not report.found
        assert report.payload is None and len(report.bits) == PAYLOAD_BITS
        assert report.summary().startswith("not found")
    flat = watermark.verify(Image.new("RGB", (256, 256), (120, 80, 200)))
    assert flat.checked and not flat.found


def test_too_small_images_are_refused_with_a_reason():
    toy = Image.new("RGB", (32, 32), "white")
    with pytest.raises(ProvenanceError, match=r"32×32.*256×256"):
        watermark.embed(toy, PAYLOAD)
    report = watermark.verify(toy)
    assert not report.checked and not report.found and "256×256" in report.reason
    assert watermark.unsupported_reason(Image.new("RGB", (256, 256))) is None
    assert watermark.unsupported_reason(Image.new("RGB", (255, 256))) is not None


def test_unknown_method_is_refused():
    with pytest.raises(ProvenanceError, match="unknown watermark method"):
        watermark.embed(natural_image(256), PAYLOAD, method="rivaGan")


def test_verify_reports_the_method_that_found_the_mark():
    marked = watermark.embed(textured_image(256, seed=2), PAYLOAD)
    report = watermark.verify(marked)
    assert report.found and report.method == watermark.DEFAULT_METHOD == "dwtDctSvd"
    assert report.to_dict()["payload"] == {
        "version": 1,
        "ai_generated": True,
        "content_id": f"{PAYLOAD.content_id:06x}",
    }

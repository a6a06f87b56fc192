"""Benign procedural test images large enough for the invisible watermark (no downloads)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def natural_image(size: int = 256, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: smooth colour fields (1/f^1.8 noise) over a shared 1/f luminance texture."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.fftfreq(size)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0

    def field(alpha: float) -> np.ndarray:
        spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / f**alpha
        spectrum[0, 0] = 0.0
        values = np.real(np.fft.ifft2(spectrum))
        return (values - values.mean()) / values.std()

    luminance = field(1.0)
    colour = np.stack([field(1.8) for _ in range(3)], axis=-1)
    pixels = np.clip(0.5 + 0.12 * colour + 0.12 * luminance[..., None], 0.0, 1.0)
    return Image.fromarray((pixels * 255).astype(np.uint8), "RGB")


def textured_image(size: int = 256, seed: int = 0) -> Image.Image:
    """Stripes, blobs and per-pixel noise: a busier image than :func:`natural_image`."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    pixels = np.zeros((size, size, 3))
    for c in range(3):
        f = rng.uniform(2, 9, 3)
        p = rng.uniform(0, 2 * np.pi, 3)
        pixels[..., c] = (
            0.5
            + 0.2 * np.sin(2 * np.pi * (f[0] * x + p[0])) * np.cos(2 * np.pi * (f[1] * y + p[1]))
            + 0.15 * np.sin(2 * np.pi * (f[2] * (x + y) + p[2]))
        )
    for _ in range(12):
        cx, cy = rng.uniform(0, 1, 2)
        radius = rng.uniform(0.03, 0.15)
        inside = (x - cx) ** 2 + (y - cy) ** 2 < radius**2
        pixels[inside] = pixels[inside] * 0.4 + rng.uniform(0, 1, 3) * 0.6
    pixels += rng.normal(0, 0.03, pixels.shape)
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    """``image`` saved to bytes in ``fmt`` (``"PNG"``, ``"JPEG"``, ...)."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()

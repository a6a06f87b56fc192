"""Checks on the images users and classifiers hand to safelatent (one place, used by every consumer)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from .errors import InvalidArgumentError

__all__ = ["as_rgb", "check_images"]


def check_images(images: Sequence[Image.Image]) -> list[Image.Image]:
    """The images as a list, after checking that each is a PIL image (not a path, array or tensor)."""
    if isinstance(images, Image.Image):
        raise InvalidArgumentError("expected a list of images, got one image", "wrap it in a list")
    out = list(images)
    for i, im in enumerate(out):
        if not isinstance(im, Image.Image):
            raise InvalidArgumentError(
                f"image {i} is a {type(im).__name__}, not a PIL image",
                "convert arrays with PIL.Image.fromarray(array) (uint8 RGB, H×W×3)",
            )
    return out


def as_rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB mode (alpha dropped, palette and greyscale expanded); the same object if it is
    already RGB."""
    return image if image.mode == "RGB" else image.convert("RGB")

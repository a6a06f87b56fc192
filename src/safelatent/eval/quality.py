"""Quality and domain measures from CLIP embeddings (local CLIP weights only).

* **CLIP score** (Hessel et al., "CLIPScore", EMNLP 2021, Eq. 1, with the scale w = 100 used by
  torchmetrics' ``CLIPScore`` and text-to-image papers): ``100 · max(cos(E_image, E_text), 0)`` per image
  and its prompt — how well an image follows its prompt.
* **Domain score** of an adapter on real models: the cosine similarity of each image's CLIP embedding to
  the centroid of a reference image folder's (unit) embeddings — how much an image looks like the theme
  (the toy world uses its exact theme classifier instead).

Both are pure functions over embeddings (:func:`clip_score`, :func:`domain_similarity`);
:class:`QualityScorer` loads the encoders once and applies them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidArgumentError

__all__ = ["CLIP_SCORE_SCALE", "QualityScorer", "clip_score", "domain_similarity", "reference_images"]

#: w in Hessel et al. Eq. 1 as text-to-image work reports it (torchmetrics ``CLIPScore``): 100
CLIP_SCORE_SCALE = 100.0
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> np.ndarray:
    """``100 · max(cos, 0)`` for each (image, text) pair, row by row (Hessel et al. 2021, Eq. 1)."""
    if image_embeds.shape != text_embeds.shape:
        raise InvalidArgumentError(
            f"{tuple(image_embeds.shape)} image vs {tuple(text_embeds.shape)} text embeddings"
        )
    cos = (_unit(image_embeds.double()) * _unit(text_embeds.double())).sum(-1)
    return (CLIP_SCORE_SCALE * cos.clamp_min(0.0)).numpy()


def domain_similarity(image_embeds: torch.Tensor, reference_embeds: torch.Tensor) -> np.ndarray:
    """Cosine similarity of each image embedding to the centroid of the unit reference embeddings."""
    if len(reference_embeds) == 0:
        raise InvalidArgumentError("no reference embeddings", "give a folder with reference images")
    centroid = _unit(_unit(reference_embeds.double()).mean(0, keepdim=True))
    return (_unit(image_embeds.double()) @ centroid.T)[:, 0].numpy()


def reference_images(folder: str | os.PathLike) -> list[Image.Image]:
    """The images of a reference folder (PNG, JPEG, WebP, BMP; sorted by name), as RGB."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InvalidArgumentError(f"reference image folder {folder} not found", "pass a folder of images")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not paths:
        raise InvalidArgumentError(f"{folder} has no images", f"add {', '.join(_IMAGE_SUFFIXES)} files")
    out = []
    for path in paths:
        try:
            with Image.open(path) as image:
                out.append(image.convert("RGB"))
        except OSError as error:
            raise InvalidArgumentError(
                f"cannot read reference image {path}: {error}", "remove or fix it"
            ) from None
    return out


class QualityScorer:
    """CLIP score (needs a full local CLIP folder) and, with ``reference_dir``, the domain score."""

    def __init__(
        self, clip_path: str | os.PathLike, *, reference_dir: str | os.PathLike | None = None, device=None
    ) -> None:
        from ..models.clip_text import load_clip_text_encoder
        from ..models.clip_vision import load_clip_image_encoder

        self.images = load_clip_image_encoder(clip_path, device=device)
        self.texts = load_clip_text_encoder(clip_path, device=device)
        self.reference = (
            self.images.embed(reference_images(reference_dir)) if reference_dir is not None else None
        )

    def scores(self, images: Sequence[Image.Image], prompt: str) -> list[dict[str, float]]:
        """Per image: ``clip_score`` against ``prompt`` and (with a reference folder) ``domain``."""
        image_embeds = self.images.embed(images)
        text_embeds = self.texts.embed([prompt]).expand(len(images), -1)
        scores = clip_score(image_embeds, text_embeds)
        out = [{"clip_score": round(float(s), 4)} for s in scores]
        if self.reference is not None:
            for row, value in zip(out, domain_similarity(image_embeds, self.reference), strict=True):
                row["domain"] = round(float(value), 6)
        return out

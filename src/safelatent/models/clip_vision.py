"""A local CLIP image encoder: projected image embeddings from a folder on disk, offline.

CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021,
https://github.com/openai/CLIP) maps an image to an embedding in the space it shares with text. Several
parts of safelatent need that embedding: the Q16 output classifier
(:mod:`safelatent.safety.classifiers.q16`) and, later, CLIP score. This module is the one place that
loads the vision tower and turns PIL images into embeddings.

**Loading** (:func:`load_clip_image_encoder`): a local folder holding either a full ``CLIPModel`` (e.g. a
copy of ``openai/clip-vit-large-patch14``: ``config.json`` with ``model_type: "clip"`` plus
``model.safetensors``; the text tower is ignored) or a ``CLIPVisionModelWithProjection``
(``model_type: "clip_vision_model"``). It is read with transformers'
``CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True, use_safetensors=True)``
inside :func:`~safelatent.models.offline.offline_mode`: hub ids are never resolved and nothing is ever
unpickled — a folder with only ``pytorch_model.bin`` is refused (:class:`UnsafeCheckpointError`) with the
conversion to safetensors as the hint. For a full CLIP folder the projection width is taken from the
top-level ``projection_dim`` (the one ``CLIPModel`` builds its ``visual_projection`` with), not from
``vision_config``, whose own default may differ. Missing weights (e.g. a ``CLIPVisionModel`` without the
projection) are an error, never a silent random initialisation.

**Preprocessing** (:func:`preprocess`) reproduces OpenAI CLIP's ``_transform(n_px)`` exactly — torchvision
``Resize(n_px, BICUBIC)`` (shorter side to ``n_px``, longer side ``int(n_px * long / short)``, PIL's
bicubic resize, skipped when the size is already right), ``CenterCrop(n_px)`` (offsets
``int(round((size - n_px) / 2))``, Python's round-half-to-even), conversion to RGB (after the crop, as in
CLIP), ``ToTensor`` (÷ 255 in float32) and ``Normalize`` with CLIP's mean/std — with PIL and numpy only
(torchvision is not needed). ``n_px`` is the model config's ``image_size``. transformers'
``CLIPImageProcessor`` differs in one detail: it crops at ``(size - n_px) // 2``, one pixel off from
torchvision when the difference is ≡ 3 (mod 4).

**Embedding** (:meth:`ClipImageEncoder.embed`): the projected image embedding (``image_embeds``, after
``visual_projection``; *not* L2-normalised), float32 on the CPU, under ``torch.inference_mode()``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import (
    InvalidArgumentError,
    ModelFormatError,
    ModelNotFoundError,
    OfflineViolationError,
    UnsafeCheckpointError,
)
from ..images import check_images
from .loading import check_device, check_dtype, library_progress_bars_off
from .offline import offline_mode

__all__ = [
    "CLIP_VARIANTS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "SHIPPED_VISION_CONFIGS",
    "ClipImageEncoder",
    "clip_variant",
    "load_clip_image_encoder",
    "preprocess",
    "shipped_vision_config",
]

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

CLIP_VARIANTS: dict[str, dict[str, int]] = {
    "ViT-L-14": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "patch_size": 14,
        "image_size": 224,
        "projection_dim": 768,
    },
    "ViT-B-16": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "patch_size": 16,
        "image_size": 224,
        "projection_dim": 512,
    },
    "ViT-B-32": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "patch_size": 32,
        "image_size": 224,
        "projection_dim": 512,
    },
}
"""OpenAI CLIP vision towers by name (open_clip spelling): the config values that identify each."""

SHIPPED_VISION_CONFIGS: dict[str, str] = {"ViT-L-14": "clip_vit_l14_vision"}
"""Variant → folder under ``safelatent/models/configs/`` with its ``config.json`` (architecture only)."""

_MODEL_TYPES = ("clip", "clip_vision_model")
_TEXT_TOWER = ("text_model.", "text_projection.", "logit_scale")
"""Weights of a full CLIP folder that the image encoder does not use."""
_FOLDER_HINT = (
    "pass a local folder with config.json and model.safetensors: a full CLIP model (e.g. a copy of "
    "openai/clip-vit-large-patch14) or a CLIPVisionModelWithProjection saved with save_pretrained"
)


def clip_variant(config: Any) -> str | None:
    """The OpenAI CLIP vision tower a config describes (``"ViT-L-14"``, ``"ViT-B-16"``, ``"ViT-B-32"``), or
    ``None`` when it matches none of :data:`CLIP_VARIANTS` exactly (other widths, depths or resolutions,
    e.g. ViT-L/14@336px). ``config``: a ``CLIPVisionConfig`` or a dict of its fields."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    for name, values in CLIP_VARIANTS.items():
        if all(get(key) == value for key, value in values.items()):
            return name
    return None


def shipped_vision_config(variant: str = "ViT-L-14") -> Any:
    """The ``CLIPVisionConfig`` (with projection) shipped for ``variant``: the exact architecture, no
    weights; build it on ``torch.device("meta")`` to inspect shapes without memory."""
    from importlib import resources

    from transformers import CLIPVisionConfig

    if variant not in SHIPPED_VISION_CONFIGS:
        raise InvalidArgumentError(
            f"no shipped CLIP vision config for {variant!r}",
            f"shipped: {', '.join(SHIPPED_VISION_CONFIGS)}",
        )
    folder = resources.files("safelatent.models") / "configs" / SHIPPED_VISION_CONFIGS[variant]
    fields = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for key in ("model_type", "architectures"):
        fields.pop(key, None)
    return CLIPVisionConfig(**fields)


# --------------------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------------------


def _resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size, BICUBIC)`` on a PIL image."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)`` on a PIL image at least ``size`` pixels in each direction."""
    width, height = image.size
    top = round((height - size) / 2.0)  # Python 3 round: half to even, like torchvision
    left = round((width - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def preprocess(images: Sequence[Image.Image], image_size: int = 224) -> torch.Tensor:
    """OpenAI CLIP's image transform on PIL images: a float32 tensor ``[N, 3, image_size, image_size]``.

    Resize the shorter side to ``image_size`` (bicubic), centre-crop a square, convert to RGB, scale to
    [0, 1] and normalise with :data:`OPENAI_CLIP_MEAN` / :data:`OPENAI_CLIP_STD` — the same numbers as
    ``clip.load(...)[1]``.
    """
    if not (isinstance(image_size, int) and image_size > 0):
        raise InvalidArgumentError(f"image_size must be a positive int, got {image_size!r}", "use e.g. 224")
    mean = np.asarray(OPENAI_CLIP_MEAN, dtype=np.float32)
    std = np.asarray(OPENAI_CLIP_STD, dtype=np.float32)
    arrays = []
    for image in check_images(images):
        if min(image.size) < 1:
            raise InvalidArgumentError(f"image of size {image.size} has no pixels", "pass non-empty images")
        cropped = _center_crop(_resize_shorter_side(image, image_size), image_size)
        rgb = cropped if cropped.mode == "RGB" else cropped.convert("RGB")
        x = np.asarray(rgb, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
        arrays.append(((x - mean) / std).transpose(2, 0, 1))
    if not arrays:
        return torch.empty(0, 3, image_size, image_size, dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))


# --------------------------------------------------------------------------------------------------------
# the encoder
# --------------------------------------------------------------------------------------------------------


class ClipImageEncoder:
    """A CLIP vision tower with its projection, ready to embed PIL images.

    ``model``: a ``transformers.CLIPVisionModelWithProjection`` (put in ``eval()`` mode here).
    ``source``: where it came from (for messages and audit logs). Attributes: ``config``, ``image_size``,
    ``projection_dim``, ``variant`` (:func:`clip_variant` of the config), ``device``, ``dtype``.
    """

    def __init__(self, model: Any, *, source: str | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        self.source = source
        self.image_size = int(self.config.image_size)
        self.projection_dim = int(self.config.projection_dim)
        self.variant: str | None = clip_variant(self.config)
        first = next(model.parameters())
        self.device: torch.device = first.device
        self.dtype: torch.dtype = first.dtype

    def __repr__(self) -> str:
        return (
            f"ClipImageEncoder(variant={self.variant!r}, projection_dim={self.projection_dim}, "
            f"image_size={self.image_size}, device={self.device}, dtype={self.dtype}, source={self.source!r})"
        )

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """:func:`preprocess` at this model's ``image_size``: float32 ``[N, 3, S, S]`` on the CPU."""
        return preprocess(images, self.image_size)

    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected embeddings ``[N, projection_dim]`` (float32, CPU) of already preprocessed pixels."""
        with torch.inference_mode():
            x = pixel_values.to(device=self.device, dtype=self.dtype)
            return self.model(pixel_values=x).image_embeds.float().cpu()

    def embed(self, images: Sequence[Image.Image], batch_size: int = 16) -> torch.Tensor:
        """Projected CLIP image embeddings ``[N, projection_dim]``, float32 on the CPU, not normalised;
        ``batch_size`` images per forward pass."""
        images = check_images(images)
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise InvalidArgumentError(f"batch_size must be an int ≥ 1, got {batch_size!r}", "use e.g. 16")
        out = [
            self.embed_pixels(self.preprocess(images[start : start + batch_size]))
            for start in range(0, len(images), batch_size)
        ]
        if not out:
            return torch.empty(0, self.projection_dim, dtype=torch.float32)
        return torch.cat(out)


# --------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------


def _resolve_folder(path: str | os.PathLike) -> Path:
    text = os.fspath(path)
    folder = Path(text).expanduser()
    if not folder.exists():
        looks_like_hub_id = "/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1
        if looks_like_hub_id:
            raise ModelNotFoundError(
                f"CLIP model {text!r} is not a local folder; it looks like a Hugging Face Hub id",
                "safelatent never downloads models: download it yourself (e.g. `hf download "
                f"{text} config.json model.safetensors --local-dir DIR`) and pass DIR",
            )
        raise ModelNotFoundError(f"CLIP model folder not found: {text}", _FOLDER_HINT)
    if not folder.is_dir():
        raise ModelFormatError(f"CLIP model path {text} is a file, not a folder", _FOLDER_HINT)
    return folder


def _vision_config(folder: Path) -> Any:
    """The ``CLIPVisionConfig`` (with projection) of a full-CLIP or vision-with-projection folder.

    A full CLIP config is read with transformers' own ``CLIPConfig`` — so legacy files (e.g. the
    ``vision_config_dict`` of openai/clip-vit-large-patch14) resolve exactly as ``CLIPModel`` resolves them —
    and its top-level ``projection_dim`` (the width ``CLIPModel`` builds ``visual_projection`` with)
    replaces the vision config's own, which in such files is often missing (default 512)."""
    from huggingface_hub.errors import OfflineModeIsEnabled
    from transformers import CLIPConfig, CLIPVisionConfig

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelFormatError(f"{folder} has no config.json", _FOLDER_HINT)
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFormatError(f"cannot read {config_file}: {error}", "fix or replace the file") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in _MODEL_TYPES:
        raise ModelFormatError(
            f"{config_file} describes a {model_type!r} model, not CLIP",
            f"expected model_type {' or '.join(map(repr, _MODEL_TYPES))}; {_FOLDER_HINT}",
        )
    try:
        with offline_mode():
            if model_type == "clip":
                full = CLIPConfig.from_pretrained(str(folder), local_files_only=True)
                config = full.vision_config
                config.projection_dim = int(full.projection_dim)
            else:
                config = CLIPVisionConfig.from_pretrained(str(folder), local_files_only=True)
    except OfflineModeIsEnabled as error:  # a ConnectionError, hence an OSError: must come first
        raise _offline_violation(folder, error) from error
    except (OSError, TypeError, ValueError, KeyError) as error:
        raise ModelFormatError(f"invalid CLIP config {config_file}: {error}", _FOLDER_HINT) from None
    return config


def _offline_violation(folder: Path, error: BaseException) -> OfflineViolationError:
    return OfflineViolationError(
        f"loading CLIP from {folder} tried to contact a model hub ({error})",
        "safelatent never downloads; this is a bug — please report it with the folder layout you used",
    )


def _check_weights(folder: Path) -> None:
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise UnsafeCheckpointError(
            f"{folder} has only pickle-based weights ({', '.join(pickles)}), which safelatent never loads "
            "for CLIP (unpickling can run code stored in the file)",
            "convert them to model.safetensors, only if you trust their origin and in an isolated sandbox: "
            "`transformers.CLIPModel.from_pretrained(DIR, use_safetensors=False).save_pretrained(DIR)` "
            "(the class that saved it; or download the model.safetensors the publisher provides instead)",
        )
    raise ModelFormatError(f"{folder} has no model.safetensors", _FOLDER_HINT)


def load_clip_image_encoder(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> ClipImageEncoder:
    """Load a CLIP vision tower with projection from a local folder, without network access.

    ``path``: a folder with ``config.json`` + ``*.safetensors`` of a full ``CLIPModel`` or of a
    ``CLIPVisionModelWithProjection``. ``device``: default CUDA when available, else the CPU. ``dtype``:
    default float32.

    Raises :class:`ModelNotFoundError` (no such folder; hub ids are never resolved),
    :class:`ModelFormatError` (a file, no config.json, not a CLIP config, no safetensors weights, weights
    that do not fit the config), :class:`UnsafeCheckpointError` (only ``pytorch_model.bin``: never
    unpickled) and :class:`OfflineViolationError` (a library tried to reach a hub).
    """
    device = check_device("cuda" if device is None and torch.cuda.is_available() else device or "cpu")
    dtype = torch.float32 if dtype is None else check_dtype(dtype)
    folder = _resolve_folder(path)
    config = _vision_config(folder)
    _check_weights(folder)

    from transformers import CLIPVisionModelWithProjection

    model = _load_checked(CLIPVisionModelWithProjection, folder, config, dtype, other_tower=_TEXT_TOWER)
    return ClipImageEncoder(model.to(device), source=str(folder))


def _load_checked(cls: Any, folder: Path, config: Any, dtype: torch.dtype, *, other_tower: str) -> Any:
    """``cls.from_pretrained`` from a local folder offline, safetensors only; missing or mismatched weights
    are errors (never a silent random initialisation), unexpected ones outside ``other_tower`` (the tower
    of a full CLIP folder that ``cls`` does not use) a warning."""
    from huggingface_hub.errors import OfflineModeIsEnabled
    from transformers.utils import logging as transformers_logging

    # transformers 5 logs a "LOAD REPORT" table at warning level (e.g. the unused text tower of a full CLIP
    # folder); missing and mismatched weights are checked below instead, so it is silenced while loading.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with library_progress_bars_off(), offline_mode():
            model, info = cls.from_pretrained(
                str(folder),
                config=config,
                local_files_only=True,
                use_safetensors=True,
                dtype=dtype,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported by output_loading_info and refused below
            )
    except OfflineModeIsEnabled as error:
        raise _offline_violation(folder, error) from error
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        text = str(error).strip()
        raise ModelFormatError(
            f"cannot load CLIP from {folder}: {text.splitlines()[0] if text else type(error).__name__}",
            f"check that config.json and the weights belong together; {_FOLDER_HINT}",
        ) from None
    finally:
        transformers_logging.set_verbosity(verbosity)

    missing = sorted(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        detail = f"{len(missing)} missing weights (e.g. {', '.join(missing[:3])})" if missing else ""
        if mismatched:
            first = mismatched[0]
            example = f" (e.g. {first[0]}: {tuple(first[1])} in the file, {tuple(first[2])} in config.json)"
            detail += (
                ("; " if detail else "")
                + f"{len(mismatched)} with other shapes"
                + (example if isinstance(first, tuple | list) and len(first) == 3 else "")
            )
        hint = (
            f"the folder needs the projection: use a full CLIP model or {cls.__name__}"
            if any("projection" in k for k in missing)
            else "the weights do not belong to this config.json; re-export the folder with save_pretrained"
        )
        raise ModelFormatError(f"the CLIP weights in {folder} do not fit its config: {detail}", hint)
    unexpected = [k for k in info.get("unexpected_keys") or [] if not k.startswith(other_tower)]
    if unexpected:
        logger.warning("%s: ignoring %d unexpected weights (e.g. %s)", folder, len(unexpected), unexpected[0])
    return model

"""A local CLIP text tower with its projection: the text side of CLIP score (Hessel et al., "CLIPScore: A
Reference-free Evaluation Metric for Image Captioning", EMNLP 2021), offline.

Loaded from the same kind of folder as :mod:`safelatent.models.clip_vision` — a full ``CLIPModel`` (e.g. a
copy of ``openai/clip-vit-large-patch14``: ``config.json`` + ``model.safetensors``) — through the same
checks (no hub, no pickles, no silently random weights). Texts are tokenized with the OpenAI CLIP BPE
tokenizer that ships in the package (:func:`safelatent.models.tokenizer.load_clip_tokenizer`: the
tokenizer of every OpenAI CLIP model; context 77, longer texts cut as CLIP's ``tokenize`` does).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InvalidArgumentError, ModelFormatError
from .clip_vision import _FOLDER_HINT, _check_weights, _load_checked, _offline_violation, _resolve_folder
from .loading import check_device, check_dtype
from .offline import offline_mode
from .tokenizer import load_clip_tokenizer, tokenize_prompts

__all__ = ["ClipTextEncoder", "load_clip_text_encoder"]

_VISION_TOWER = ("vision_model.", "visual_projection.", "logit_scale")


class ClipTextEncoder:
    """A ``transformers.CLIPTextModelWithProjection`` (in ``eval()`` mode) and the CLIP tokenizer."""

    def __init__(self, model: Any, *, source: str | None = None) -> None:
        self.model = model.eval()
        self.source = source
        self.projection_dim = int(model.config.projection_dim)
        self.tokenizer = load_clip_tokenizer(model_max_length=int(model.config.max_position_embeddings))
        self.device: torch.device = next(model.parameters()).device

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Projected text embeddings ``[N, projection_dim]`` (``text_embeds``), float32 on the CPU, not
        normalised."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise InvalidArgumentError("texts must be strings", "pass a list of prompts")
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                ids = tokenize_prompts(self.tokenizer, texts[start : start + batch_size]).input_ids
                out.append(self.model(input_ids=ids.to(self.device)).text_embeds.float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.projection_dim)


def load_clip_text_encoder(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None
) -> ClipTextEncoder:
    """The text tower + projection of the full CLIP model in the local folder ``path`` (offline; errors as
    :func:`safelatent.models.clip_vision.load_clip_image_encoder`)."""
    from huggingface_hub.errors import OfflineModeIsEnabled
    from transformers import CLIPConfig, CLIPTextModelWithProjection

    device = check_device("cuda" if device is None and torch.cuda.is_available() else device or "cpu")
    dtype = torch.float32 if dtype is None else check_dtype(dtype)
    folder = _resolve_folder(path)
    _check_weights(folder)
    try:
        with offline_mode():
            full = CLIPConfig.from_pretrained(str(folder), local_files_only=True)
    except OfflineModeIsEnabled as error:
        raise _offline_violation(folder, error) from error
    except (OSError, TypeError, ValueError, KeyError) as error:
        raise ModelFormatError(f"{folder} is not a full CLIP model ({error})", _FOLDER_HINT) from None
    if full.model_type != "clip":
        raise ModelFormatError(
            f"{folder} holds a {full.model_type!r} model; CLIP score needs a full CLIP model (both towers)",
            _FOLDER_HINT,
        )
    config = full.text_config
    config.projection_dim = int(full.projection_dim)
    model = _load_checked(CLIPTextModelWithProjection, folder, config, dtype, other_tower=_VISION_TOWER)
    return ClipTextEncoder(model.to(device), source=str(folder))

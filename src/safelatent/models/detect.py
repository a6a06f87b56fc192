"""Recognise which Stable Diffusion family a checkpoint belongs to, from its key names and shapes alone.

Implements the detection half of single-file loading (issue 2): the original Stable Diffusion
(LDM/CompVis, Rombach et al. 2022, https://github.com/CompVis/stable-diffusion) checkpoints keep each
component under a fixed prefix:

======================================  =====================================================
``model.diffusion_model.*``             the UNet (all versions)
``first_stage_model.*``                 the VAE (all versions)
``cond_stage_model.transformer.*``      SD 1.x text encoder: Hugging Face ``CLIPTextModel`` (ViT-L/14)
``cond_stage_model.model.*``            SD 2.x text encoder: OpenCLIP ViT-H/14
``conditioner.embedders.*``             SDXL's two text encoders
``model_ema.*``                         EMA copy of the UNet (ignored: the non-EMA weights are used)
======================================  =====================================================

The same prefixes drive diffusers' own ``infer_diffusers_model_type`` (``diffusers.loaders.
single_file_utils``); this module only needs the SD 1.x / 2.x / XL split plus clear errors, and works
from ``{key: shape}`` so a ``.safetensors`` header can be checked before any tensor is read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import ModelFormatError

__all__ = [
    "COMPONENT_DESCRIPTIONS",
    "LDM_PREFIXES",
    "SingleFileLayout",
    "detect_folder_architecture",
    "detect_single_file",
]

#: Where each component lives in an original SD 1.x single-file checkpoint.
LDM_PREFIXES: dict[str, str] = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}

#: Human names for error messages.
COMPONENT_DESCRIPTIONS: dict[str, str] = {
    "unet": "UNet (model.diffusion_model.*)",
    "vae": "VAE (first_stage_model.*)",
    "text_encoder": "CLIP text encoder (cond_stage_model.transformer.*)",
}

_SD2_TEXT_PREFIX = "cond_stage_model.model."
_SDXL_PREFIX = "conditioner.embedders."
_UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
_CROSS_ATTN_K = re.compile(r"^model\.diffusion_model\..*attn2\.to_k\.weight$")
_DIFFUSERS_UNET_KEYS = ("conv_in.", "down_blocks.", "mid_block.", "up_blocks.", "time_embedding.")
_EXPECTED_SD1 = (
    "expected an original Stable Diffusion 1.x checkpoint with keys model.diffusion_model.* (UNet), "
    "first_stage_model.* (VAE) and cond_stage_model.transformer.* (CLIP text encoder)"
)

_IN_CHANNEL_VARIANTS = {
    9: "an inpainting model (9 UNet input channels)",
    8: "an InstructPix2Pix model (8 UNet input channels)",
}


@dataclass(frozen=True)
class SingleFileLayout:
    """What :func:`detect_single_file` found in a checkpoint."""

    #: ``"sd15"`` (the Stable Diffusion 1.x family).
    architecture: str
    #: Components whose prefix occurs, in the order unet, vae, text_encoder.
    present: tuple[str, ...]
    #: Components an SD 1.x pipeline needs but the file lacks.
    missing: tuple[str, ...]
    #: Keys that belong to no component we load (EMA copy, scheduler buffers, VAE loss, ...).
    ignored_keys: tuple[str, ...] = field(default=(), repr=False)


def _first_keys(keys: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} keys)" if len(keys) > n else "")


def _cross_attention_dim(shapes: Mapping[str, Sequence[int]]) -> int | None:
    for key, shape in shapes.items():
        if _CROSS_ATTN_K.match(key) and len(shape) == 2:
            return int(shape[1])
    return None


def detect_single_file(
    shapes: Mapping[str, Sequence[int]], source: str, *, unet_in_channels: int = 4
) -> SingleFileLayout:
    """Classify a single-file checkpoint from its ``{key: shape}`` header.

    Returns a :class:`SingleFileLayout` for the SD 1.x family (``model.diffusion_model.*`` with
    ``cond_stage_model.transformer.*``; a file with only some of the components is still recognised and
    its ``missing`` components listed). Raises :class:`ModelFormatError` for SD 2.x
    (``cond_stage_model.model.*`` or a 1024-wide cross-attention), SDXL (``conditioner.embedders.*``,
    ``label_emb`` or 2048-wide cross-attention), SD 1.x variants whose UNet input differs from
    ``unet_in_channels`` (inpainting, InstructPix2Pix), diffusers-layout state dicts, and anything else
    — each message names what was found and what was expected.
    """
    keys = list(shapes)
    if not keys:
        raise ModelFormatError(f"{source} contains no tensors", _EXPECTED_SD1)

    if any(k.startswith(_SDXL_PREFIX) for k in keys):
        raise ModelFormatError(
            f"{source} is recognised as a Stable Diffusion XL checkpoint (conditioner.embedders.* keys), "
            "which is not supported yet",
            "use a Stable Diffusion 1.x checkpoint (e.g. v1-5-pruned-emaonly.safetensors) "
            "or a diffusers folder",
        )
    if any(k.startswith(_SD2_TEXT_PREFIX) for k in keys):
        raise ModelFormatError(
            f"{source} is recognised as a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder, "
            "cond_stage_model.model.* keys), which is not supported yet as a single file",
            "use a Stable Diffusion 1.x checkpoint, or convert it to a diffusers folder and pass that",
        )

    present = tuple(c for c, prefix in LDM_PREFIXES.items() if any(k.startswith(prefix) for k in keys))
    if not present:
        if any(k.startswith(_DIFFUSERS_UNET_KEYS) for k in keys):
            raise ModelFormatError(
                f"{source} holds a diffusers-layout state dict (keys like {_first_keys(keys, 3)}), "
                "not an original single-file checkpoint",
                "put it in a diffusers folder (unet/diffusion_pytorch_model.safetensors with its "
                "config.json, "
                "plus vae/, text_encoder/, tokenizer/, scheduler/, model_index.json) and pass the folder",
            )
        if any(k.startswith("model_ema.") for k in keys):
            raise ModelFormatError(
                f"{source} holds only EMA weights (model_ema.*), no model.diffusion_model.* UNet",
                "export the checkpoint with its regular weights (e.g. a *-pruned or *-emaonly file)",
            )
        raise ModelFormatError(
            f"the keys of {source} fit no known Stable Diffusion layout (first keys: {_first_keys(keys)})",
            _EXPECTED_SD1,
        )

    if "unet" in present:
        if any(k.startswith("model.diffusion_model.label_emb.") for k in keys):
            raise ModelFormatError(
                f"{source} is recognised as a Stable Diffusion XL (or upscaler) UNet (label_emb keys), "
                "which is not supported yet",
                "use a Stable Diffusion 1.x checkpoint",
            )
        context_dim = _cross_attention_dim(shapes)
        if context_dim == 1024:
            raise ModelFormatError(
                f"{source} is recognised as a Stable Diffusion 2.x UNet (1024-wide cross-attention), "
                "which is not supported yet as a single file",
                "use a Stable Diffusion 1.x checkpoint, or convert it to a diffusers folder and pass that",
            )
        if context_dim == 2048:
            raise ModelFormatError(
                f"{source} is recognised as a Stable Diffusion XL UNet (2048-wide cross-attention), "
                "which is not supported yet",
                "use a Stable Diffusion 1.x checkpoint",
            )
        conv_in = shapes.get(_UNET_CONV_IN)
        if conv_in is not None and len(conv_in) == 4 and int(conv_in[1]) != unet_in_channels:
            found = int(conv_in[1])
            variant = _IN_CHANNEL_VARIANTS.get(found, f"a UNet with {found} input channels")
            raise ModelFormatError(
                f"{source} is recognised as a Stable Diffusion 1.x variant: {variant}, but text-to-image "
                f"needs {unet_in_channels} input channels; this variant is not supported yet",
                "use a text-to-image Stable Diffusion 1.x checkpoint",
            )

    missing = tuple(c for c in LDM_PREFIXES if c not in present)
    prefixes = tuple(LDM_PREFIXES.values())
    ignored = tuple(k for k in keys if not k.startswith(prefixes))
    return SingleFileLayout(architecture="sd15", present=present, missing=missing, ignored_keys=ignored)


_EXPECTED_FOLDER_CLASSES = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
}


def detect_folder_architecture(model_index: Mapping | None, unet_config: Mapping, source: str) -> str:
    """The architecture id of a diffusers-layout folder, from ``model_index.json`` and ``unet/config.json``.

    Returns ``"sd15"`` for the Stable Diffusion 1.x family (a ``UNet2DConditionModel`` conditioned on a
    ``CLIPTextModel``; reduced-width models such as the toy model included) and ``"sd2"`` for 2.x folders
    (1024-wide cross-attention), which load through the same classes. Raises :class:`ModelFormatError`
    for SDXL (``text_encoder_2`` / ``addition_embed_type="text_time"``), UNets whose input is not the 4
    latent channels (inpainting, InstructPix2Pix) and component classes other than those above.
    """
    model_index = dict(model_index or {})
    if "text_encoder_2" in model_index or unet_config.get("addition_embed_type") == "text_time":
        raise ModelFormatError(
            f"{source} is recognised as a Stable Diffusion XL folder, which is not supported yet",
            "use a Stable Diffusion 1.x (or 2.x) diffusers folder",
        )
    for component, expected in _EXPECTED_FOLDER_CLASSES.items():
        entry = model_index.get(component)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] not in (None, expected):
            raise ModelFormatError(
                f"{source}: model_index.json declares {component} as {entry[1]}, expected {expected}",
                "safelatent loads Stable Diffusion 1.x/2.x text-to-image folders (StableDiffusionPipeline)",
            )
    in_channels = int(unet_config.get("in_channels", 4))
    if in_channels != 4:
        variant = _IN_CHANNEL_VARIANTS.get(in_channels, f"a UNet with {in_channels} input channels")
        raise ModelFormatError(
            f"{source} is recognised as {variant}; text-to-image needs 4 input channels and this variant "
            "is not supported yet",
            "use a text-to-image Stable Diffusion folder",
        )
    return "sd2" if unet_config.get("cross_attention_dim") == 1024 else "sd15"

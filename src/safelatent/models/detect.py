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
    "ARCHITECTURE_NAMES",
    "ARCHITECTURE_PREFIXES",
    "COMPONENT_DESCRIPTIONS",
    "LDM_PREFIXES",
    "SingleFileLayout",
    "component_description",
    "detect_folder_architecture",
    "detect_single_file",
]

#: Where each component lives in an original SD 1.x single-file checkpoint.
LDM_PREFIXES: dict[str, str] = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}

#: Where each component lives, per architecture (SDXL base: ``conditioner.embedders.0`` is CLIP ViT-L in
#: Hugging Face layout, ``.1`` OpenCLIP ViT-bigG in open_clip layout).
ARCHITECTURE_PREFIXES: dict[str, dict[str, str]] = {
    "sd15": LDM_PREFIXES,
    "sd2": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.model.",
    },
    "sdxl": {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
}

ARCHITECTURE_NAMES: dict[str, str] = {
    "sd15": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "Stable Diffusion XL",
}

_COMPONENT_NAMES = {
    "unet": "UNet",
    "vae": "VAE",
    "text_encoder": "text encoder",
    "text_encoder_2": "second text encoder (OpenCLIP ViT-bigG)",
}


def component_description(component: str, architecture: str = "sd15") -> str:
    """A component's human name with its key prefix, e.g. ``"VAE (first_stage_model.*)"``."""
    name = _COMPONENT_NAMES[component]
    if component == "text_encoder":
        name = {
            "sd15": "CLIP text encoder",
            "sd2": "OpenCLIP text encoder",
            "sdxl": "CLIP ViT-L text encoder",
        }[architecture]
    return f"{name} ({ARCHITECTURE_PREFIXES[architecture][component]}*)"


#: Human names for error messages (SD 1.x).
COMPONENT_DESCRIPTIONS: dict[str, str] = {c: component_description(c) for c in LDM_PREFIXES}

_SD2_TEXT_PREFIX = "cond_stage_model.model."
_SDXL_PREFIX = "conditioner.embedders."
_UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
_CROSS_ATTN_K = re.compile(r"^model\.diffusion_model\..*attn2\.to_k\.weight$")
_DIFFUSERS_UNET_KEYS = ("conv_in.", "down_blocks.", "mid_block.", "up_blocks.", "time_embedding.")
_EXPECTED = (
    "expected an original Stable Diffusion checkpoint: model.diffusion_model.* (UNet), first_stage_model.* "
    "(VAE) and cond_stage_model.transformer.* (SD 1.x), cond_stage_model.model.* (SD 2.x) or "
    "conditioner.embedders.0/1.* (SDXL base) text encoders"
)

_IN_CHANNEL_VARIANTS = {
    9: "an inpainting model (9 UNet input channels)",
    8: "an InstructPix2Pix model (8 UNet input channels)",
}
_CONTEXT_ARCHITECTURE = {768: "sd15", 1024: "sd2", 2048: "sdxl"}


@dataclass(frozen=True)
class SingleFileLayout:
    """What :func:`detect_single_file` found in a checkpoint."""

    #: ``"sd15"``, ``"sd2"`` or ``"sdxl"``.
    architecture: str
    #: Components whose prefix occurs, in the order unet, vae, text_encoder[, text_encoder_2].
    present: tuple[str, ...]
    #: Components the architecture's pipeline needs but the file lacks.
    missing: tuple[str, ...]
    #: Keys that belong to no component we load (EMA copy, scheduler buffers, VAE loss, ...).
    ignored_keys: tuple[str, ...] = field(default=(), repr=False)

    @property
    def prefixes(self) -> dict[str, str]:
        return ARCHITECTURE_PREFIXES[self.architecture]


def _first_keys(keys: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} keys)" if len(keys) > n else "")


def _cross_attention_dim(shapes: Mapping[str, Sequence[int]]) -> int | None:
    for key, shape in shapes.items():
        if _CROSS_ATTN_K.match(key) and len(shape) == 2:
            return int(shape[1])
    return None


def _architecture_of(keys: list[str], shapes: Mapping[str, Sequence[int]], source: str) -> str | None:
    """The family from the text-encoder prefixes, else from the UNet's cross-attention width; ``None`` when
    the file has neither."""
    if any(k.startswith(_SDXL_PREFIX) for k in keys):
        refiner_encoder = "conditioner.embedders.0.model."
        if any(k.startswith(refiner_encoder) for k in keys) and not any(
            k.startswith(ARCHITECTURE_PREFIXES["sdxl"]["text_encoder"]) for k in keys
        ):
            raise ModelFormatError(
                f"{source} is recognised as a Stable Diffusion XL refiner (one OpenCLIP text encoder under "
                "conditioner.embedders.0.model.*), which is not supported",
                "use the SDXL base model (conditioner.embedders.0.transformer.* and "
                "conditioner.embedders.1.model.*)",
            )
        return "sdxl"
    if any(k.startswith(_SD2_TEXT_PREFIX) for k in keys):
        return "sd2"
    if any(k.startswith(LDM_PREFIXES["text_encoder"]) for k in keys):
        return "sd15"
    context_dim = _cross_attention_dim(shapes)
    has_label_emb = any(k.startswith("model.diffusion_model.label_emb.") for k in keys)
    if has_label_emb and context_dim != 2048:
        raise ModelFormatError(
            f"{source} is recognised as a class-conditioned UNet (label_emb keys, {context_dim}-wide "
            "cross-attention: an upscaler or SDXL refiner), which is not supported",
            "use a Stable Diffusion 1.x, 2.x or SDXL base text-to-image checkpoint",
        )
    if not any(k.startswith(LDM_PREFIXES["unet"]) for k in keys):
        return None
    # widths other than the released models' (config_dir gives them) are read as the SD 1.x layout
    return _CONTEXT_ARCHITECTURE.get(context_dim, "sd15")


def detect_single_file(
    shapes: Mapping[str, Sequence[int]], source: str, *, unet_in_channels: int = 4
) -> SingleFileLayout:
    """Classify a single-file checkpoint from its ``{key: shape}`` header.

    Returns a :class:`SingleFileLayout` for SD 1.x (``cond_stage_model.transformer.*``), SD 2.x
    (``cond_stage_model.model.*``, OpenCLIP) or SDXL base (``conditioner.embedders.{0,1}.*``); without a
    text encoder the UNet's cross-attention width decides (768 / 1024 / 2048). A file with only some of the
    components is still recognised and its ``missing`` components listed. Raises
    :class:`ModelFormatError` for the SDXL refiner and upscalers, UNets whose input differs from
    ``unet_in_channels`` (inpainting, InstructPix2Pix), diffusers-layout state dicts, and anything else —
    each message names what was found and what was expected.
    """
    keys = list(shapes)
    if not keys:
        raise ModelFormatError(f"{source} contains no tensors", _EXPECTED)

    architecture = _architecture_of(keys, shapes, source)
    prefixes_of = ARCHITECTURE_PREFIXES[architecture or "sd15"]
    present = tuple(c for c, prefix in prefixes_of.items() if any(k.startswith(prefix) for k in keys))
    if architecture in ("sd15", "sd2") and any(
        k.startswith("model.diffusion_model.label_emb.") for k in keys
    ):
        raise ModelFormatError(
            f"{source} is recognised as a class-conditioned {ARCHITECTURE_NAMES[architecture]} UNet "
            "(label_emb keys: SD 2.1 unCLIP or an upscaler), which is not supported",
            "use a text-to-image Stable Diffusion 1.x, 2.x or SDXL base checkpoint",
        )
    if architecture is None or not present:
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
            _EXPECTED,
        )

    if "unet" in present:
        conv_in = shapes.get(_UNET_CONV_IN)
        if conv_in is not None and len(conv_in) == 4 and int(conv_in[1]) != unet_in_channels:
            found = int(conv_in[1])
            variant = _IN_CHANNEL_VARIANTS.get(found, f"a UNet with {found} input channels")
            raise ModelFormatError(
                f"{source} is recognised as a {ARCHITECTURE_NAMES[architecture]} variant: {variant}, but "
                f"text-to-image needs {unet_in_channels} input channels; this variant is not supported yet",
                f"use a text-to-image {ARCHITECTURE_NAMES[architecture]} checkpoint",
            )

    missing = tuple(c for c in prefixes_of if c not in present)
    prefixes = tuple(prefixes_of.values())
    ignored = tuple(k for k in keys if not k.startswith(prefixes))
    return SingleFileLayout(architecture=architecture, present=present, missing=missing, ignored_keys=ignored)


_EXPECTED_FOLDER_CLASSES = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
}


def detect_folder_architecture(model_index: Mapping | None, unet_config: Mapping, source: str) -> str:
    """The architecture id of a diffusers-layout folder, from ``model_index.json`` and ``unet/config.json``.

    Returns ``"sd15"`` for the Stable Diffusion 1.x family (a ``UNet2DConditionModel`` conditioned on a
    ``CLIPTextModel``; reduced-width models such as the toy model included), ``"sd2"`` for 2.x folders
    (1024-wide cross-attention) and ``"sdxl"`` for SDXL base (``text_encoder_2`` and
    ``addition_embed_type="text_time"``). Raises :class:`ModelFormatError` for the SDXL refiner (no first
    text encoder), UNets whose input is not the 4 latent channels (inpainting, InstructPix2Pix) and
    component classes other than those above.
    """
    model_index = dict(model_index or {})
    xl = "text_encoder_2" in model_index or unet_config.get("addition_embed_type") == "text_time"
    if xl:
        first = model_index.get("text_encoder")
        if "text_encoder" in model_index and (not isinstance(first, (list, tuple)) or first[1] is None):
            raise ModelFormatError(
                f"{source} is recognised as a Stable Diffusion XL refiner (no first text encoder), "
                "which is not supported",
                "use the SDXL base folder (text_encoder/ and text_encoder_2/)",
            )
    expected_classes = dict(_EXPECTED_FOLDER_CLASSES)
    if xl:
        expected_classes["text_encoder_2"] = "CLIPTextModelWithProjection"
    for component, expected in expected_classes.items():
        entry = model_index.get(component)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] not in (None, expected):
            raise ModelFormatError(
                f"{source}: model_index.json declares {component} as {entry[1]}, expected {expected}",
                "safelatent loads Stable Diffusion 1.x/2.x/XL text-to-image folders "
                "(StableDiffusionPipeline, StableDiffusionXLPipeline)",
            )
    in_channels = int(unet_config.get("in_channels", 4))
    if in_channels != 4:
        variant = _IN_CHANNEL_VARIANTS.get(in_channels, f"a UNet with {in_channels} input channels")
        raise ModelFormatError(
            f"{source} is recognised as {variant}; text-to-image needs 4 input channels and this variant "
            "is not supported yet",
            "use a text-to-image Stable Diffusion folder",
        )
    if xl:
        return "sdxl"
    return "sd2" if unet_config.get("cross_attention_dim") == 1024 else "sd15"

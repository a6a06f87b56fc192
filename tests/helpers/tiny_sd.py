"""Small random-weight Stable Diffusion components built from the *shipped* configs (SD 1.5, SD 2.x,
SDXL) with reduced widths (same block types, same key layout, 4 VAE levels ⇒ the same 8× latent factor).

Used by the parity tests (safelatent vs diffusers' own pipelines) and the loader tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from safelatent.models.loading import scheduler_from_config
from safelatent.models.shipped import load_component_config
from safelatent.models.tokenizer import load_clip_tokenizer

TINY_OVERRIDES = {
    "unet": {
        "block_out_channels": [32, 32, 64, 64],
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "sample_size": 8,
    },
    "vae": {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "sample_size": 64},
    "text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "projection_dim": 32,
    },
}


#: SDXL at reduced widths: the same three UNet levels, two layers per block and sgm block names as SDXL
#: base (so kohya key mapping is exercised), text width 32 + 32 = 64, pooled width 32.
TINY_SDXL_OVERRIDES = {
    "unet": {
        "block_out_channels": [32, 64, 64],
        "attention_head_dim": [2, 4, 4],
        "transformer_layers_per_block": [1, 1, 2],
        "cross_attention_dim": 64,
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 32 + 6 * 8,
        "sample_size": 8,
    },
    "vae": TINY_OVERRIDES["vae"],
    "text_encoder": TINY_OVERRIDES["text_encoder"],
    "text_encoder_2": TINY_OVERRIDES["text_encoder"],
}


def tiny_config(component: str, architecture: str = "sd15") -> dict:
    config = load_component_config(architecture, component)
    overrides = TINY_SDXL_OVERRIDES if architecture == "sdxl" else TINY_OVERRIDES
    config.update(overrides.get(component, {}))
    return config


def _text_encoder(config: dict):
    cls = (
        CLIPTextModelWithProjection
        if config.get("architectures") == ["CLIPTextModelWithProjection"]
        else CLIPTextModel
    )
    text_config = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")}
    return cls(CLIPTextConfig(**text_config)).eval()


def build_tiny_sd(architecture: str = "sd15", seed: int = 0, *, full_size: bool = False) -> dict:
    """The components of a random-weight model, deterministic for a seed: unet, vae, text_encoder,
    tokenizer, scheduler (and text_encoder_2, tokenizer_2 for ``"sdxl"``).

    ``full_size=True`` uses the shipped configs unchanged (SD 1.5: an 860 M-parameter UNet, several GB
    of RAM).
    """

    def config(component):
        if full_size:
            return load_component_config(architecture, component)
        return tiny_config(component, architecture)

    torch.manual_seed(seed)
    unet_config = {k: v for k, v in config("unet").items() if not k.startswith("_")}
    vae_config = {k: v for k, v in config("vae").items() if not k.startswith("_")}
    parts = {
        "unet": UNet2DConditionModel(**unet_config).eval(),
        "vae": AutoencoderKL(**vae_config).eval(),
        "text_encoder": _text_encoder(config("text_encoder")),
        "tokenizer": load_clip_tokenizer(
            pad_token="!" if architecture.startswith("sd2") else "<|endoftext|>"
        ),
        "scheduler": scheduler_from_config(config("scheduler")),
    }
    if architecture == "sdxl":
        parts["text_encoder_2"] = _text_encoder(config("text_encoder_2"))
        parts["tokenizer_2"] = load_clip_tokenizer(pad_token="!")
    return parts


def build_tiny_sd15(seed: int = 0, *, full_size: bool = False) -> dict:
    """:func:`build_tiny_sd` for SD 1.5."""
    return build_tiny_sd("sd15", seed, full_size=full_size)


def write_tiny_config_dir(path: Path, architecture: str = "sd15") -> Path:
    """A diffusers-layout config folder (no weights) with the reduced widths, for single-file loading."""
    from safelatent.models.shipped import shipped_config_dir

    path = Path(path)
    components = ["unet", "vae", "text_encoder", "scheduler"] + (
        ["text_encoder_2"] if architecture == "sdxl" else []
    )
    for component in components:
        (path / component).mkdir(parents=True, exist_ok=True)
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        (path / component / name).write_text(json.dumps(tiny_config(component, architecture), indent=2))
    (path / "model_index.json").write_text(
        (shipped_config_dir(architecture) / "model_index.json").read_text()
    )
    return path

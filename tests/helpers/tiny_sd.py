"""Small random-weight Stable Diffusion 1.5 components built from the *shipped* SD 1.5 configs with
reduced widths (same block types, same key layout, 4 VAE levels ⇒ the same 8× latent factor).

Used by the parity tests (safelatent vs diffusers' own pipelines) and the loader tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

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


def tiny_config(component: str) -> dict:
    config = load_component_config("sd15", component)
    config.update(TINY_OVERRIDES.get(component, {}))
    return config


def build_tiny_sd15(seed: int = 0, *, full_size: bool = False) -> dict:
    """unet, vae, text_encoder, tokenizer, scheduler — random weights, deterministic for a seed.

    ``full_size=True`` uses the shipped configs unchanged (860 M-parameter UNet: several GB of RAM).
    """

    def config(component):
        return load_component_config("sd15", component) if full_size else tiny_config(component)

    torch.manual_seed(seed)
    unet_config = {k: v for k, v in config("unet").items() if not k.startswith("_")}
    vae_config = {k: v for k, v in config("vae").items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**unet_config).eval()
    vae = AutoencoderKL(**vae_config).eval()
    text_config = {
        k: v for k, v in config("text_encoder").items() if k not in ("architectures", "torch_dtype")
    }
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).eval()
    scheduler = PNDMScheduler.from_config(config("scheduler"))
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": load_clip_tokenizer(),
        "scheduler": scheduler,
    }


def write_tiny_config_dir(path: Path) -> Path:
    """A diffusers-layout config folder (no weights) with the reduced widths, for single-file loading."""
    path = Path(path)
    for component in ("unet", "vae", "text_encoder", "scheduler"):
        (path / component).mkdir(parents=True, exist_ok=True)
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        (path / component / name).write_text(json.dumps(tiny_config(component), indent=2))
    from safelatent.models.shipped import shipped_config_dir

    (path / "model_index.json").write_text((shipped_config_dir("sd15") / "model_index.json").read_text())
    return path

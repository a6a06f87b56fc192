"""The toy model's architecture: Stable Diffusion's own component classes, tiny.

``AutoencoderKL`` (32×32 RGB ↔ 8×8×4 latents, factor 4), ``UNet2DConditionModel`` with cross-attention
on 8×8 latents, ``CLIPTextModel`` over the full CLIP BPE vocabulary (so any prompt tokenizes exactly as
for SD 1.x, with the shipped tokenizer), and SD 1.x's noise schedule (scaled-linear β 0.00085–0.012,
1000 steps, ε-prediction), so DDIM/PNDM/Euler/DPM-Solver behave as on SD. Saved as a normal diffusers
folder, it loads through :func:`safelatent.models.loading.load_components` like any SD checkpoint.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import torch

IMAGE_SIZE = 32
LATENT_SIZE = 8
#: Classifier-free guidance scale the toy model is evaluated and demonstrated with.
TOY_CFG_SCALE = 3.0
#: Text context (CLIP positions) of the toy text encoder; prompts are padded/truncated to it.
CONTEXT_LENGTH = 32
#: Steps and scheduler of the documented quality figures.
TOY_EVAL_STEPS = 50

VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": IMAGE_SIZE,
    "act_fn": "silu",
    # fully convolutional, so it can be trained on crops and applied to whole images
    "mid_block_add_attention": False,
}

UNET_CONFIG = {
    "sample_size": LATENT_SIZE,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [48, 96, 96],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}

TEXT_ENCODER_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    # Toy captions need ≤ 17 tokens; a 32-token context (SD: 77) makes training ~25 % faster on CPU.
    # The loader pads prompts to the text encoder's context, so the shipped model keeps working.
    "max_position_embeddings": CONTEXT_LENGTH,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
    # SD 1.x's values (legacy pooled-output indexing); the UNet reads the last hidden state.
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

#: SD 1.x's training noise schedule; DDIM is the toy's default sampler.
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def toy_model_dir() -> Path:
    """The shipped toy model (a diffusers-layout folder inside the package)."""
    return Path(str(resources.files("safelatent.toy") / "weights"))


def build_components(seed: int = 0) -> dict:
    """Fresh random toy components (vae, unet, text_encoder, tokenizer, scheduler)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    return {
        "vae": AutoencoderKL(**VAE_CONFIG),
        "unet": UNet2DConditionModel(**UNET_CONFIG),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG)),
        "tokenizer": load_clip_tokenizer(),
        "scheduler": DDIMScheduler.from_config(SCHEDULER_CONFIG),
    }


def save_model(components: dict, out_dir: Path, *, dtype: torch.dtype = torch.float16) -> Path:
    """Write a diffusers-layout folder (safetensors, ``dtype`` weights) that the loader reads."""
    from ..models.tokenizer import clip_tokenizer_dir

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder"):
        model = components[name]
        original = next(model.parameters()).dtype
        model.to(dtype)
        model.save_pretrained(out_dir / name, safe_serialization=True)
        model.to(original)
    components["scheduler"].save_pretrained(out_dir / "scheduler")
    if (out_dir / "tokenizer").exists():
        shutil.rmtree(out_dir / "tokenizer")
    shutil.copytree(clip_tokenizer_dir(), out_dir / "tokenizer")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", type(components["scheduler"]).__name__],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out_dir

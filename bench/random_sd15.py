"""Stable Diffusion 1.5's exact architecture with random weights, for benchmarks.

Built from the configs that ship in the package (no download): the FLOPs and memory are those of the
trained model. ``widths="tiny"`` keeps SD 1.5's block types and key layout with reduced widths, for smoke
runs on a CPU.
"""

from __future__ import annotations

import torch

#: ``--widths tiny``: SD 1.5's block types and key layout with reduced widths (for smoke tests only)
TINY = {
    "unet": {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "cross_attention_dim": 32,
             "attention_head_dim": 4},
    "vae": {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                     "num_hidden_layers": 2, "projection_dim": 32},
}  # fmt: skip


def build_components(widths: str, scheduler: str = "DDPMScheduler"):
    """Random-weight SD 1.5 components (fp32, CPU, seed 0) from the shipped configs; ``scheduler`` is a
    diffusers scheduler class name, configured with SD 1.5's noise schedule."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from safelatent.models.components import StableDiffusionComponents
    from safelatent.models.shipped import load_component_config
    from safelatent.models.tokenizer import load_clip_tokenizer

    def config(name):
        values = {k: v for k, v in load_component_config("sd15", name).items() if not k.startswith("_")}
        values.update(TINY.get(name, {}) if widths == "tiny" else {})
        return values

    torch.manual_seed(0)
    text_config = {
        k: v for k, v in config("text_encoder").items() if k not in ("architectures", "torch_dtype")
    }
    return StableDiffusionComponents(
        unet=UNet2DConditionModel(**config("unet")),
        vae=AutoencoderKL(**config("vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
        tokenizer=load_clip_tokenizer(),
        scheduler=getattr(diffusers, scheduler).from_config(config("scheduler")),
        architecture="sd15",
        source=f"random-sd15-{widths}",
        model_hash="random",
    )

"""LoRA adapters for tests: random peft adapters on a model, and files written in each layout.

The reference for every round trip is the model with the adapter added in memory by peft itself
(``add_adapter`` with ``init_lora_weights=False``, so ``B ≠ 0`` and the adapter changes the outputs).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from safelatent.models.adapters import save_lora

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "v_proj", "fc1"]


def lora_config(
    targets, *, r: int = 4, alpha: float = 8, alpha_pattern=None, rank_pattern=None
) -> LoraConfig:
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets),
        alpha_pattern=dict(alpha_pattern or {}),
        rank_pattern=dict(rank_pattern or {}),
        init_lora_weights=False,
    )


def add_random_lora(model, config: LoraConfig, name: str, seed: int) -> dict[str, torch.Tensor]:
    """Add a peft adapter with seeded random A and B; return its state dict (model's module names)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        model.add_adapter(config, adapter_name=name)
    with torch.no_grad():
        for module_name, param in model.named_parameters():
            if f".{name}." in module_name + "." and ("lora_A" in module_name or "lora_B" in module_name):
                param.normal_(0.0, 0.05)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def prefixed(unet_sd=None, text_sd=None, text_2_sd=None) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v for k, v in (unet_sd or {}).items()}
    out.update({f"text_encoder.{k}": v for k, v in (text_sd or {}).items()})
    out.update({f"text_encoder_2.{k}": v for k, v in (text_2_sd or {}).items()})
    return out


def module_alphas(model, adapter: str, component: str) -> dict[str, float]:
    """``<component>.<module>`` → α of every peft layer of ``adapter`` (scale · r)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        f"{component}.{name}": module.scaling[adapter] * module.r[adapter]
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer) and adapter in module.scaling
    }


def write_diffusers(path: Path, state_dict, configs=None) -> Path:
    """The diffusers/peft layout (``lora_adapter_metadata`` when ``configs`` are given)."""
    return save_lora(path, state_dict, configs=configs)


def write_safelatent(path: Path, state_dict, configs, info) -> Path:
    return save_lora(path, state_dict, configs=configs, info=info)


def write_kohya(path: Path, state_dict, alphas: dict[str, float]) -> Path:
    """kohya layout via diffusers' ``convert_state_dict_to_kohya``, with each module's α written to ``.alpha``
    (diffusers writes the rank) and SD 1.x's ``lora_te_`` prefix (diffusers writes SDXL's ``lora_te1_``)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    peft_keys = {}
    for key, value in state_dict.items():
        component, rest = key.split(".", 1)
        if component == "text_encoder" and not rest.startswith("text_model."):
            rest = "text_model." + rest
        peft_keys[f"{component}.{rest}"] = value
    kohya = convert_state_dict_to_kohya(peft_keys)
    out = {}
    for key, value in kohya.items():
        out[key.replace("lora_te1_", "lora_te_")] = value.contiguous()
    for module, alpha in alphas.items():
        component, rest = module.split(".", 1)
        if component == "text_encoder" and not rest.startswith("text_model."):
            rest = "text_model." + rest
        stem = ("lora_unet_" if component == "unet" else "lora_te_") + rest.replace(".", "_")
        assert f"{stem}.lora_down.weight" in out, stem
        out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    save_file(out, str(path))
    return path


def random_lora_pair(
    layer: torch.nn.Module, rank: int, generator: torch.Generator, std: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (down, up) of a rank-``rank`` LoRA for a Linear or Conv2d layer, shaped as kohya and peft
    store them: down ``(r, in)`` / ``(r, in, kh, kw)``, up ``(out, r)`` / ``(out, r, 1, 1)``."""
    weight = layer.weight
    down = torch.randn(rank, *weight.shape[1:], generator=generator) * std
    up = torch.randn(weight.shape[0], rank, *([1, 1] if weight.ndim == 4 else []), generator=generator) * std
    return down, up


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale·B·A`` in the layer's weight shape (a 3×3 conv down with a 1×1 up gives a 3×3 delta)."""
    return scale * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def write_kohya_modules(path: Path, modules) -> Path:
    """A kohya (sd-scripts) file from ``{stem: (down, up, alpha)}``: ``<stem>.lora_down.weight``,
    ``<stem>.lora_up.weight`` and ``<stem>.alpha`` (left out when ``alpha`` is ``None``)."""
    out = {}
    for stem, (down, up, alpha) in modules.items():
        out[f"{stem}.lora_down.weight"] = down.detach().clone().contiguous()  # no shared storage
        out[f"{stem}.lora_up.weight"] = up.detach().clone().contiguous()
        if alpha is not None:
            out[f"{stem}.alpha"] = torch.tensor(float(alpha))
    save_file(out, str(path))
    return path


def tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A :class:`~safelatent.api.Pipeline` over tiny random SD 1.5 components (same seed ⇒ same weights)."""
    from helpers.tiny_sd import build_tiny_sd15
    from safelatent.api import Pipeline
    from safelatent.models.components import StableDiffusionComponents

    parts = build_tiny_sd15(seed=seed)
    for name in ("unet", "vae", "text_encoder"):
        torch.nn.Module.to(parts[name], dtype)  # diffusers' own .to() warns about fp32-pinned modules
    components = StableDiffusionComponents(
        **parts, architecture="sd15", source="tiny", model_hash="0123456789"
    )
    return Pipeline(components)


@torch.no_grad()
def probe(unet, text_encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """UNet noise prediction and text-encoder hidden states on fixed inputs (in the UNet's dtype)."""
    generator = torch.Generator().manual_seed(1234)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator).to(unet.dtype)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator).to(unet.dtype)
    ids = torch.randint(0, 1000, (2, 77), generator=generator)
    eps = unet(sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample
    hidden = text_encoder(ids).last_hidden_state
    return eps, hidden

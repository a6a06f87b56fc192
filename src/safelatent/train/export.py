"""The adapter files a LoRA run writes.

* ``pytorch_lora_weights.safetensors`` — diffusers/peft layout, written by diffusers'
  ``StableDiffusionLoraLoaderMixin.save_lora_weights``: keys ``unet.<module>.lora_A.weight`` /
  ``.lora_B.weight`` and ``text_encoder.text_model.<module>.lora_A.weight`` …, plus the
  ``lora_adapter_metadata`` header entry (the peft ``LoraConfig`` of each part, keys prefixed ``unet.`` /
  ``text_encoder.``) through which diffusers honours ``lora_alpha ≠ r`` on load. safelatent adds one
  header entry, ``safelatent``: JSON with the format version, trigger, rank, alpha, base-model hash,
  architecture, steps, every training setting and the data summary.
* ``<name>_kohya.safetensors`` (optional) — the kohya-ss / AUTOMATIC1111 layout from diffusers'
  ``convert_state_dict_to_kohya``: ``lora_unet_…`` / ``lora_te_…`` keys with ``.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``, and ``ss_*`` header entries like kohya's trainer writes.

Text-encoder keys are written with CLIP's ``text_model.`` prefix whatever the installed transformers
calls the module (transformers ≥ 5 flattened ``CLIPTextModel``): that is the layout published SD LoRAs
use, and diffusers strips the prefix when the loaded model has none.

LoRA: Hu et al. 2021, *LoRA: Low-Rank Adaptation of Large Language Models*, arXiv 2106.09685 — the update
``ΔW = (α / r) · B A`` with ``A`` ("down") of shape r × in and ``B`` ("up") of shape out × r.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.adapters.formats import DIFFUSERS_WEIGHT_NAME
from ..models.adapters.formats import SAFELATENT_METADATA_KEY as SAFELATENT_KEY

SAFELATENT_FORMAT_VERSION = 1
TEXT_MODEL_PREFIX = "text_model."


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained LoRA tensors of ``model`` (peft's ``get_peft_model_state_dict``), float32 on the CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def canonical_text_encoder_keys(state: dict[str, torch.Tensor], text_encoder) -> dict[str, torch.Tensor]:
    """Prefix ``text_model.`` when this transformers' CLIPTextModel has no such module (see above)."""
    if hasattr(text_encoder, "text_model"):
        return dict(state)
    return {k if k.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + k: v for k, v in state.items()}


def adapter_metadata(model: torch.nn.Module) -> dict[str, Any]:
    """The peft ``LoraConfig`` of ``model``'s adapter as a dict (what diffusers' training scripts pass as
    ``unet_lora_adapter_metadata``)."""
    return model.peft_config["default"].to_dict()


def save_diffusers_lora(
    out_dir: str | Path,
    *,
    unet_lora: dict[str, torch.Tensor],
    unet_metadata: dict[str, Any],
    text_encoder_lora: dict[str, torch.Tensor] | None = None,
    text_encoder_metadata: dict[str, Any] | None = None,
    text_encoder_2_lora: dict[str, torch.Tensor] | None = None,
    text_encoder_2_metadata: dict[str, Any] | None = None,
    safelatent_metadata: dict[str, Any],
    weight_name: str = DIFFUSERS_WEIGHT_NAME,
) -> Path:
    """Write the diffusers-format file with diffusers' own writer (``StableDiffusionLoraLoaderMixin``,
    or ``StableDiffusionXLLoraLoaderMixin`` when SDXL's second text encoder has a LoRA), then add the
    ``safelatent`` header entry (``save_lora_weights`` takes no custom metadata, so the file is re-written
    once, atomically, with the same tensors and diffusers' header entries unchanged)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".lora-") as tmp:
        text = {
            "text_encoder_lora_layers": text_encoder_lora or None,
            "text_encoder_lora_adapter_metadata": text_encoder_metadata if text_encoder_lora else None,
        }
        if text_encoder_2_lora:
            StableDiffusionXLLoraLoaderMixin.save_lora_weights(
                tmp,
                unet_lora_layers=unet_lora,
                unet_lora_adapter_metadata=unet_metadata,
                text_encoder_2_lora_layers=text_encoder_2_lora,
                text_encoder_2_lora_adapter_metadata=text_encoder_2_metadata,
                safe_serialization=True,
                **text,
            )
        else:
            StableDiffusionLoraLoaderMixin.save_lora_weights(
                tmp,
                unet_lora_layers=unet_lora,
                unet_lora_adapter_metadata=unet_metadata,
                safe_serialization=True,
                **text,
            )
        written = Path(tmp) / DIFFUSERS_WEIGHT_NAME
        with safe_open(str(written), "pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
        metadata[SAFELATENT_KEY] = json.dumps(safelatent_metadata, sort_keys=True)
        staged = Path(tmp) / "with-metadata.safetensors"
        save_file(tensors, str(staged), metadata=metadata)
        final = out_dir / weight_name
        shutil.move(str(staged), str(final))
    return final


def to_kohya(
    unet_lora: dict[str, torch.Tensor],
    text_encoder_lora: dict[str, torch.Tensor] | None,
    alpha: float,
    text_encoder_2_lora: dict[str, torch.Tensor] | None = None,
    *,
    sdxl: bool = False,
) -> dict[str, torch.Tensor]:
    """kohya-ss keys via diffusers' ``convert_state_dict_to_kohya``, with two fixes: an SD 1.x/2.x file's
    text encoder prefix is ``lora_te_`` (diffusers writes SDXL's ``lora_te1_``; SDXL files keep
    ``lora_te1_``/``lora_te2_``), and ``.alpha`` is the trained α (diffusers writes the rank, which is
    only right when α = rank)."""
    from diffusers.utils import convert_state_dict_to_kohya

    peft = {f"unet.{k}": v for k, v in unet_lora.items()}
    peft.update({f"text_encoder.{k}": v for k, v in (text_encoder_lora or {}).items()})
    peft.update({f"text_encoder_2.{k}": v for k, v in (text_encoder_2_lora or {}).items()})
    out = {}
    for key, value in convert_state_dict_to_kohya(peft).items():
        if key.startswith("lora_te1_") and not sdxl:
            key = "lora_te_" + key[len("lora_te1_") :]
        if key.endswith(".alpha"):
            value = torch.tensor(float(alpha), dtype=torch.float32)
        out[key] = value.contiguous()
    return out


def save_kohya_lora(
    path: str | Path,
    *,
    unet_lora: dict[str, torch.Tensor],
    text_encoder_lora: dict[str, torch.Tensor] | None,
    rank: int,
    alpha: float,
    kohya_metadata: dict[str, str],
    safelatent_metadata: dict[str, Any],
    text_encoder_2_lora: dict[str, torch.Tensor] | None = None,
    sdxl: bool = False,
) -> Path:
    """Write the kohya-ss / AUTOMATIC1111 file (atomically)."""
    path = Path(path)
    tensors = to_kohya(unet_lora, text_encoder_lora, alpha, text_encoder_2_lora, sdxl=sdxl)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        **kohya_metadata,
        SAFELATENT_KEY: json.dumps(safelatent_metadata, sort_keys=True),
    }
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path

"""Write diffusers Stable Diffusion 1.x models as an original (LDM/CompVis) single-file checkpoint.

The reverse of diffusers' single-file conversion, after diffusers' own
``scripts/convert_diffusers_to_original_stable_diffusion.py`` (huggingface/diffusers), generalised from
its hard-coded SD 1.5 block counts to any ``layers_per_block`` / number of levels, so the reduced-width
test models of :mod:`tests.helpers.tiny_sd` can be written in the same key layout as a real
``v1-5-pruned-emaonly.safetensors``:

* UNet → ``model.diffusion_model.*`` (``input_blocks`` / ``middle_block`` / ``output_blocks``, ResNet
  layers renamed ``in_layers`` / ``out_layers`` / ``emb_layers`` / ``skip_connection``);
* VAE → ``first_stage_model.*`` (``down.{i}.block.{j}``, ``up.{N-1-i}``, ``mid.block_{1,2}``,
  ``mid.attn_1.{norm,q,k,v,proj_out}`` with the linear attention weights reshaped to 1×1 convolutions);
* CLIP text encoder → ``cond_stage_model.transformer.text_model.*`` (plus the ``position_ids`` buffer
  that real SD 1.x files carry);
* SD 2.x: the text encoder in open_clip layout under ``cond_stage_model.model.*`` (fused ``in_proj``,
  ``c_fc``/``c_proj``, transposed ``text_projection``) — the reverse of diffusers'
  ``convert_open_clip_checkpoint``;
* SDXL base: CLIP ViT-L under ``conditioner.embedders.0.transformer.*``, OpenCLIP bigG under
  ``conditioner.embedders.1.model.*``, the UNet's ``add_embedding`` as ``label_emb.0.{0,2}``.

:func:`write_random_safetensors` streams a file of random tensors from shapes alone (no model in memory),
for the full-size SDXL test.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = [
    "components_to_ldm",
    "text_encoder_to_ldm",
    "text_encoder_to_open_clip",
    "unet_to_ldm",
    "vae_to_ldm",
    "write_ldm_checkpoint",
    "write_random_safetensors",
]

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
    # diffusers < 0.15 names, in case a state dict uses them
    "query.": "q.",
    "key.": "k.",
    "value.": "v.",
    "proj_attn.": "proj_out.",
}


def _rename(rest: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` keys → LDM ``UNetModel`` keys (without the file prefix).

    Down block ``i`` has ``layers_per_block`` layers (+ a downsampler), each an ``input_blocks`` entry;
    up block ``i`` has ``layers_per_block + 1`` layers, the upsampler sitting after the last layer's
    ResNet (index 1) or attention (index 2).
    """
    per_down = layers_per_block + 1
    up_has_attention = {
        int(m.group(1)) for k in state_dict if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = None
        for old, ldm in _UNET_TOP.items():
            if key.startswith(old):
                new = ldm + key[len(old) :]
        if new is None and (m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = per_down * i + j + 1
            new = (
                f"input_blocks.{index}.0.{_rename(rest, _UNET_RESNET)}"
                if kind == "resnets"
                else f"input_blocks.{index}.1.{rest}"
            )
        elif new is None and (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)):
            new = f"input_blocks.{per_down * (int(m[1]) + 1)}.0.op.{m[2]}"
        elif new is None and (m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key)):
            new = f"middle_block.{2 * int(m[1])}.{_rename(m[2], _UNET_RESNET)}"
        elif new is None and (m := re.match(r"mid_block\.attentions\.0\.(.*)", key)):
            new = f"middle_block.1.{m[1]}"
        elif new is None and (m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = per_down * i + j
            new = (
                f"output_blocks.{index}.0.{_rename(rest, _UNET_RESNET)}"
                if kind == "resnets"
                else f"output_blocks.{index}.1.{rest}"
            )
        elif new is None and (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key)):
            i = int(m[1])
            position = 2 if i in up_has_attention else 1
            new = f"output_blocks.{per_down * i + layers_per_block}.{position}.{m[2]}"
        if new is None:
            raise KeyError(f"no LDM name for UNet key {key!r}")
        out[new] = value
    return out


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` keys → LDM ``AutoencoderKL`` keys (without the file prefix).

    Decoder up blocks are numbered in reverse in LDM (``up.{num_levels - 1 - i}``); the mid-block
    attention's linear q/k/v/out weights become 1×1 convolution weights ``(C, C, 1, 1)``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        part, _, rest = key.partition(".")
        if part in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        if (m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest)) and part == "encoder":
            new = f"down.{m[1]}.block.{m[2]}.{_rename(m[3], _VAE_RESNET)}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.(.*)", rest):
            new = f"down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
            new = f"up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{_rename(m[3], _VAE_RESNET)}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", rest):
            new = f"up.{num_levels - 1 - int(m[1])}.upsample.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
            new = f"mid.block_{int(m[1]) + 1}.{_rename(m[2], _VAE_RESNET)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", rest):
            new = f"mid.attn_1.{_rename(m[1], _VAE_ATTENTION)}"
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
        elif rest.startswith("conv_norm_out."):
            new = "norm_out." + rest[len("conv_norm_out.") :]
        elif rest.startswith(("conv_in.", "conv_out.")):
            new = rest
        else:
            raise KeyError(f"no LDM name for VAE key {key!r}")
        out[f"{part}.{new}"] = value
    return out


def text_encoder_to_ldm(
    state_dict: Mapping[str, torch.Tensor], *, position_ids: bool = True
) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModel`` keys → ``transformer.text_model.*`` (SD 1.x ``FrozenCLIPEmbedder``).

    transformers ≥ 5.6 has no ``text_model.`` level; it is added back, as real files have it.
    ``position_ids=True`` adds the ``embeddings.position_ids`` buffer that real SD 1.x files carry.
    """
    out = {}
    for key, value in state_dict.items():
        out["transformer.text_model." + key.removeprefix("text_model.")] = value
    if position_ids:
        length = out["transformer.text_model.embeddings.position_embedding.weight"].shape[0]
        out["transformer.text_model.embeddings.position_ids"] = torch.arange(length).unsqueeze(0)
    return out


_OPEN_CLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def text_encoder_to_open_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModel[WithProjection]`` keys → open_clip ``TextTransformer`` keys (no prefix):
    q/k/v fused into ``attn.in_proj_weight``/``in_proj_bias``, ``text_projection`` stored transposed."""
    flat = {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    layers = sorted({int(m[1]) for k in flat if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    for i in layers:
        base = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            parts = [flat.pop(f"{base}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(parts)
        for key in [k for k in flat if k.startswith(base)]:
            out[f"transformer.resblocks.{i}.{_rename(key[len(base) :], _OPEN_CLIP_LAYER)}"] = flat.pop(key)
    for key, name in _OPEN_CLIP_TOP.items():
        out[name] = flat.pop(key)
    if "text_projection.weight" in flat:
        out["text_projection"] = flat.pop("text_projection.weight").T
    if flat:
        raise KeyError(f"no open_clip name for text encoder keys {sorted(flat)[:3]}")
    return out


#: where each text encoder goes, per architecture: (file prefix, open_clip layout?)
_TEXT_LAYOUT = {
    "sd15": {"text_encoder": ("cond_stage_model.", False)},
    "sd2": {"text_encoder": ("cond_stage_model.model.", True)},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.", False),
        "text_encoder_2": ("conditioner.embedders.1.model.", True),
    },
}


def components_to_ldm(
    unet: torch.nn.Module | None = None,
    vae: torch.nn.Module | None = None,
    text_encoder: torch.nn.Module | None = None,
    *,
    text_encoder_2: torch.nn.Module | None = None,
    architecture: str = "sd15",
    dtype: torch.dtype | None = None,
    position_ids: bool = True,
) -> dict[str, torch.Tensor]:
    """One LDM-layout state dict (``model.diffusion_model.*``, ``first_stage_model.*`` and the text
    encoder(s) where ``architecture`` keeps them) from diffusers/transformers models; ``None`` components
    are left out. Floating-point tensors are cast to ``dtype`` when given, and every tensor is made
    contiguous. Works on meta tensors too (key names and shapes only)."""
    out: dict[str, torch.Tensor] = {}
    if unet is not None:
        for key, value in unet_to_ldm(unet.state_dict(), unet.config.layers_per_block).items():
            out["model.diffusion_model." + key] = value
    if vae is not None:
        for key, value in vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)).items():
            out["first_stage_model." + key] = value
    encoders = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    for name, (prefix, open_clip) in _TEXT_LAYOUT[architecture].items():
        model = encoders[name]
        if model is None:
            continue
        state = model.state_dict()
        ldm = (
            text_encoder_to_open_clip(state)
            if open_clip
            else text_encoder_to_ldm(state, position_ids=position_ids)
        )
        for key, value in ldm.items():
            out[prefix + key] = value
    for key, value in out.items():
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.detach().contiguous()
    return out


def write_ldm_checkpoint(
    path: Path,
    unet: torch.nn.Module | None = None,
    vae: torch.nn.Module | None = None,
    text_encoder: torch.nn.Module | None = None,
    *,
    text_encoder_2: torch.nn.Module | None = None,
    architecture: str = "sd15",
    dtype: torch.dtype | None = None,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write :func:`components_to_ldm` (plus ``extra`` tensors, e.g. EMA keys) as a ``.safetensors`` file."""
    state = components_to_ldm(
        unet, vae, text_encoder, text_encoder_2=text_encoder_2, architecture=architecture, dtype=dtype
    )
    state.update(extra or {})
    save_file(state, str(path))
    return Path(path)


_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}


def write_random_safetensors(
    path: Path, shapes: Mapping[str, tuple[int, ...]], *, dtype: torch.dtype = torch.float16, seed: int = 0
) -> Path:
    """A ``.safetensors`` file (format: 8-byte little-endian header size, JSON header, raw data) of
    random normal values × 0.02, written tensor by tensor so only one tensor is ever in memory.

    Values come from one 16 Mi-element random block, cycled: enough for a loading test, cheap on 2 cores.
    """
    import json
    import struct

    generator = torch.Generator().manual_seed(seed)
    block = (torch.randn(1 << 24, generator=generator) * 0.02).to(dtype)
    block_bytes = block.view(torch.uint8).numpy().tobytes()
    width = block.element_size()
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = width
        for dim in shape:
            size *= int(dim)
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    position = 0
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for entry in header.values():
            remaining = entry["data_offsets"][1] - entry["data_offsets"][0]
            while remaining:
                start = position % len(block_bytes)
                chunk = block_bytes[start : start + remaining]
                handle.write(chunk)
                remaining -= len(chunk)
                position += len(chunk)
    return Path(path)

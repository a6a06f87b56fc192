"""Check that a LoRA fits a model — every key names a layer, every shape fits — before anything is injected.

The result is an :class:`InjectionPlan`: per component, the peft state dict in the model's own module names
and the peft ``LoraConfig`` arguments that reproduce each module's rank ``r`` and ``α`` exactly
(``h = W0·x + (α/r)·B·A·x``, Hu et al. 2021, arXiv 2106.09685). Modules whose rank or ``α`` differ from the
most common one get anchored ``rank_pattern`` / ``alpha_pattern`` entries (``^<escaped module name>``),
which peft's ``get_pattern_key`` matches against that module only. Nothing here changes a model.

A file that adapts ``text_encoder_2`` (kohya ``lora_te2_…``, diffusers ``text_encoder_2.…``; see
``StableDiffusionXLLoraLoaderMixin``) was made for Stable Diffusion XL: on a model without a second text
encoder it is refused as such before any layer is compared.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import InvalidWeightsError, ModelFormatError
from ..detect import ARCHITECTURE_NAMES
from .formats import LoraFile

__all__ = ["ComponentPlan", "InjectionPlan", "plan_injection"]

_A, _B = ".lora_A.weight", ".lora_B.weight"
#: Module-name parts that belong to peft's own wrappers, never a target of a LoRA file.
_PEFT_PARTS = {"base_layer", "lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B"}
#: Cross-attention (context) widths of the Stable Diffusion families: what an adapter's to_k/to_v take.
_CONTEXT_WIDTHS = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "Stable Diffusion XL"}
_TEXT_WIDTHS = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x"}
#: SDXL's second text encoder (OpenCLIP bigG) is 1280 wide.
_TEXT_2_WIDTHS = {1280: "Stable Diffusion XL"}
#: Architecture ids → the family name errors use (the loader's names).
_FAMILIES = ARCHITECTURE_NAMES


@dataclass(frozen=True)
class ComponentPlan:
    """What peft injects into one component: keys ``<module>.lora_A|B.weight`` in the model's names, and
    the ``LoraConfig`` keyword arguments."""

    component: str
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]


@dataclass(frozen=True)
class InjectionPlan:
    lora: LoraFile
    components: dict[str, ComponentPlan]


def _base_layer(module: nn.Module) -> nn.Module:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _target_name(name: str, modules: Mapping[str, nn.Module]) -> str | None:
    """The model's name for a file's module name (``text_model.`` added or dropped, as transformers'
    CLIPTextModel is nested or flat), or ``None`` when no LoRA-able module has that name."""
    candidates = [name]
    if name.startswith("text_model."):
        candidates.append(name.removeprefix("text_model."))
    else:
        candidates.append("text_model." + name)
    for candidate in candidates:
        if candidate in modules and not _PEFT_PARTS.intersection(candidate.split(".")):
            return candidate
    return None


def _expected_shapes(layer: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(down, up) shapes a rank-``rank`` LoRA of ``layer`` has, as peft builds it; ``None`` if unsupported."""
    if isinstance(layer, nn.Linear):
        return (rank, layer.in_features), (layer.out_features, rank)
    if isinstance(layer, nn.Conv2d) and layer.groups == 1:
        return (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    return None


def _family_of(key: str, down_shape: tuple[int, ...], component: str) -> str | None:
    """The model family an adapter layer's input width points to, for the layers where it is telling."""
    if component == "unet" and re.search(r"attn2\.(to_k|to_v)$", key) and len(down_shape) == 2:
        return _CONTEXT_WIDTHS.get(down_shape[1])
    if component == "text_encoder" and re.search(r"self_attn\.q_proj$", key) and len(down_shape) == 2:
        return _TEXT_WIDTHS.get(down_shape[1])
    if component == "text_encoder_2" and re.search(r"self_attn\.q_proj$", key) and len(down_shape) == 2:
        return _TEXT_2_WIDTHS.get(down_shape[1])
    return None


def _model_words(architecture: str) -> str:
    """``"sdxl (Stable Diffusion XL)"`` for error messages; the id alone when it is not a known one."""
    family = _FAMILIES.get(architecture)
    return f"{architecture} ({family})" if family else architecture


def _check_second_text_encoder(lora: LoraFile, models: Mapping[str, nn.Module], architecture: str) -> None:
    """A file adapting ``text_encoder_2`` on a model without it: made for SDXL, say so."""
    if "text_encoder_2" in models:
        return
    keys = [repr(lora.source_key(m)) for m in lora.modules if m.split(".", 1)[0] == "text_encoder_2"]
    if keys:
        raise ModelFormatError(
            f"LoRA {lora.path.name} was made for Stable Diffusion XL: {len(keys)} of {len(lora.modules)} "
            f"adapted layers belong to SDXL's second text encoder (text_encoder_2), which this "
            f"{_model_words(architecture)} model does not have ({_first(keys)})",
            "use a LoRA trained for the model you loaded, or load an SDXL model for this LoRA",
        )


def _first(items, n: int = 3) -> str:
    items = list(items)
    return "; ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _config(targets: list[str], ranks: Mapping[str, int], alphas: Mapping[str, float]) -> dict[str, Any]:
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "rank_pattern": {f"^{re.escape(m)}": ranks[m] for m in targets if ranks[m] != r},
        "alpha_pattern": {f"^{re.escape(m)}": alphas[m] for m in targets if alphas[m] != alpha},
        "inference_mode": True,
    }


def plan_injection(
    lora: LoraFile, models: Mapping[str, nn.Module], *, architecture: str = "sd15"
) -> InjectionPlan:
    """Check every module of ``lora`` against ``models`` (``{"unet": …, "text_encoder": …}``, plus
    ``"text_encoder_2"`` for SDXL) and build the injection plan; raise ONE error naming the file and its
    first mismatching keys.

    :class:`ModelFormatError`: an SDXL file (``text_encoder_2`` layers) on a model without a second text
    encoder, keys that name no Linear/Conv2d layer of the model, or shapes that point to another model
    family (an SD 1.x, SD 2.x or SDXL cross-attention / text-encoder width). :class:`InvalidWeightsError`:
    other shapes that do not fit.
    """
    where = lora.path.name
    _check_second_text_encoder(lora, models, architecture)
    words = _model_words(architecture)
    wanted = _FAMILIES.get(architecture, architecture)
    module_maps = {component: dict(model.named_modules()) for component, model in models.items()}
    unknown: list[str] = []
    misfit: list[str] = []
    families: Counter[str] = Counter()
    per_component: dict[str, dict[str, Any]] = {}
    for module in lora.modules:
        component, name = module.split(".", 1)
        source = lora.source_key(module)
        modules = module_maps.get(component)
        target = None if modules is None else _target_name(name, modules)
        if target is None:
            unknown.append(repr(source))
            continue
        layer = _base_layer(modules[target])
        down, up = lora.state_dict[module + _A], lora.state_dict[module + _B]
        rank = int(down.shape[0])
        expected = _expected_shapes(layer, rank)
        if expected is None:
            unknown.append(f"{source!r} (names a {type(layer).__name__}, not a Linear or Conv2d layer)")
            continue
        if (tuple(down.shape), tuple(up.shape)) != expected:
            misfit.append(
                f"{source!r} has down {tuple(down.shape)} / up {tuple(up.shape)}, the layer {target} needs "
                f"{expected[0]} / {expected[1]}"
            )
            family = _family_of(target, tuple(down.shape), component)
            if family is not None:
                families[family] += 1
            continue
        plan = per_component.setdefault(component, {"state_dict": {}, "ranks": {}, "alphas": {}})
        plan["state_dict"][target + _A] = down
        plan["state_dict"][target + _B] = up
        plan["ranks"][target] = rank
        plan["alphas"][target] = lora.network_alphas.get(module, float(rank))
    total = len(lora.modules)
    if families:
        family = families.most_common(1)[0][0]
        raise ModelFormatError(
            f"LoRA {where} was trained for {family}: {len(misfit)} of {total} layers have other widths than "
            f"this {words} model ({_first(misfit)})",
            f"use a LoRA trained for the same base model family as the model you loaded ({wanted})",
        )
    if unknown:
        extra = f"; {len(misfit)} more do not fit in shape" if misfit else ""
        raise ModelFormatError(
            f"LoRA {where}: {len(unknown)} of {total} adapted layers name no layer of this {words} "
            f"model ({_first(unknown)}){extra}",
            f"the adapter was made for another architecture (or is damaged): use a LoRA trained for {wanted}",
        )
    if misfit:
        raise InvalidWeightsError(
            f"LoRA {where}: {len(misfit)} of {total} adapted layers do not fit this {words} model "
            f"({_first(misfit)})",
            "the adapter was trained for a model with other layer widths: use one made for this base model",
        )
    components = {
        component: ComponentPlan(
            component=component,
            state_dict=plan["state_dict"],
            config=_config(list(plan["ranks"]), plan["ranks"], plan["alphas"]),
        )
        for component, plan in per_component.items()
    }
    return InjectionPlan(lora=lora, components=components)

"""Inject, stack, fuse and remove LoRA adapters in a loaded model — peft's layers, swapped atomically.

Each adapted layer computes ``h = W0·x + Σ_i w_i·(α_i/r_i)·B_i·A_i·x`` (LoRA, Hu et al. 2021, arXiv
2106.09685; ``w_i`` the per-adapter weight of a stack). The layers are peft's: the UNet gets them through
diffusers' ``UNet2DConditionModel.load_lora_adapter``, the CLIP text encoders (SDXL's second one,
``text_encoder_2``, as ``StableDiffusionXLLoraLoaderMixin.load_lora_weights`` does) through transformers'
``load_adapter`` (the call diffusers' ``_load_lora_into_text_encoder`` makes after re-deriving key names,
a step :mod:`.formats` has already done and that diffusers cannot do for an adapter of MLP layers only);
weights are set with diffusers' ``set_adapters`` / ``set_adapters_for_text_encoder``; fusing with
``fuse_lora`` / ``fuse_text_encoder_lora``.

:meth:`LoraStack.set` replaces the adapter set atomically: every file is read and checked against the
model first (:func:`.validate.plan_injection`); only then are the new adapters injected beside the old
ones. If injection still fails, the new adapters are deleted and the old set is reactivated; a model that
had no adapters gets its original modules back (peft's wrappers removed), so it is exactly as before.
Unfusing restores the saved original weights bit for bit instead of subtracting the delta again (which
would drift in fp16).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import ModelFormatError, SafelatentError
from ..loading import first_line, library_progress_bars_off
from ..offline import offline_mode
from .formats import COMPONENTS, read_lora
from .spec import LoraSpec
from .validate import InjectionPlan, plan_injection

#: adapter names are unique in the process: two pipelines over the same loaded models (or a model
#: reused after another stack) never collide on a peft adapter name
_ADAPTER_NUMBERS = itertools.count(1)

__all__ = ["ActiveLora", "LoraStack"]


@dataclass(frozen=True)
class ActiveLora:
    """An adapter applied to the model: what PNG ``parameters`` and sidecars record about it."""

    name: str
    path: Path
    weight: float
    hash: str
    format: str
    trigger_words: tuple[str, ...]
    components: tuple[str, ...]
    #: The peft adapter name inside the models (internal, unique per injection).
    adapter_name: str
    base_model_hash: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "weight": self.weight,
            "hash": self.hash,
            "format": self.format,
            "trigger_words": list(self.trigger_words),
        }


def _tuner_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


_VERBOSITY_LOCK = threading.Lock()


@contextlib.contextmanager
def _transformers_warnings_off():
    """transformers ≥ 5 logs a "LOAD REPORT" table calling the keys of the *other* adapters already in the
    text encoder "MISSING" whenever one more is loaded, though every adapter loads whole (stacked outputs
    equal peft's own adapters in tests/test_adapters_stack.py). The file was validated before injection
    (:mod:`.validate`), so the table is noise: transformers' warnings are off for this one call."""
    from transformers.utils import logging as hf_logging

    with _VERBOSITY_LOCK:  # process-wide setting: service workers may load adapters at the same time
        previous = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(previous)


class LoraStack:
    """The LoRA adapters applied to one model's UNet and text encoder(s).

    ``text_encoder_2``: SDXL's second text encoder (``CLIPTextModelWithProjection``); adapters with
    ``text_encoder_2`` layers (kohya ``lora_te2_…``) are injected there, and setting, fusing, unfusing and
    removing cover it like the other components. Without it such adapters are refused as made for SDXL.
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module,
        *,
        text_encoder_2: nn.Module | None = None,
        architecture: str = "sd15",
    ) -> None:
        self._models: dict[str, nn.Module] = {"unet": unet, "text_encoder": text_encoder}
        if text_encoder_2 is not None:
            self._models["text_encoder_2"] = text_encoder_2
        self._architecture = architecture
        self._active: list[ActiveLora] = []
        self._originals: dict[tuple[str, str], torch.Tensor] | None = None

    @property
    def active(self) -> list[ActiveLora]:
        return list(self._active)

    @property
    def fused(self) -> bool:
        return self._originals is not None

    # ---------------------------------------------------------------------------------------------------
    # replacing the set
    # ---------------------------------------------------------------------------------------------------

    def set(self, specs: Sequence[LoraSpec | str | os.PathLike], *, fuse: bool = False) -> list[ActiveLora]:
        """Replace the active adapters by ``specs`` (``[]`` removes all); on any error the previous set
        stays exactly as it was. ``fuse`` merges the weighted deltas into the base weights (faster
        sampling; :meth:`unfuse` restores the exact original weights)."""
        if isinstance(specs, str | os.PathLike | LoraSpec):
            specs = [specs]
        parsed = [LoraSpec.coerce(spec) for spec in specs]
        # kohya's sgm block numbers count in this UNet's layers_per_block (diffusers' load_lora_weights
        # passes unet_config=self.unet.config the same way)
        unet_config = getattr(self._models["unet"], "config", None)
        with offline_mode():
            plans = [
                plan_injection(
                    read_lora(spec.path, unet_config=unet_config),
                    self._models,
                    architecture=self._architecture,
                )
                for spec in parsed
            ]
        was_fused = self.fused
        previous = self._active
        self.unfuse()
        added: list[ActiveLora] = []
        try:
            with offline_mode(), library_progress_bars_off():
                for spec, plan in zip(parsed, plans, strict=True):
                    entry = self._entry(spec, plan)
                    added.append(entry)
                    self._inject(plan, entry.adapter_name)
                self._activate(added)
        except BaseException as error:  # also KeyboardInterrupt: never leave a half-applied set behind
            self._delete([entry.adapter_name for entry in added])
            self._activate(previous)
            if was_fused:
                self.fuse()
            if isinstance(error, SafelatentError) or not isinstance(error, Exception):
                raise
            failed = added[-1].path.name if added else "?"
            raise ModelFormatError(
                f"LoRA {failed} could not be applied ({first_line(error)}); the model was left unchanged",
                "check that the adapter was made for this base model; if it was, please report this",
            ) from error
        self._delete([entry.adapter_name for entry in previous])
        self._active = added
        if fuse:
            self.fuse()
        return self.active

    def _entry(self, spec: LoraSpec, plan: InjectionPlan) -> ActiveLora:
        lora = plan.lora
        return ActiveLora(
            name=spec.display_name,
            path=lora.path,
            weight=spec.weight,
            hash=lora.hash,
            format=lora.format,
            trigger_words=tuple(lora.trigger_words),
            components=tuple(c for c in COMPONENTS if c in plan.components),
            adapter_name=f"safelatent_{next(_ADAPTER_NUMBERS)}",
            base_model_hash=lora.base_model_hash,
        )

    def _inject(self, plan: InjectionPlan, adapter_name: str) -> None:
        from peft import LoraConfig

        for component in COMPONENTS:  # the UNet first, then the text encoder(s)
            if component not in plan.components:
                continue
            part, model = plan.components[component], self._models[component]
            with warnings.catch_warnings():
                # peft warns whenever an adapter is injected beside another: stacking is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                if component == "unet":
                    model.load_lora_adapter(
                        dict(part.state_dict),
                        prefix=None,
                        adapter_name=adapter_name,
                        metadata=dict(part.config),
                    )
                else:
                    with _transformers_warnings_off():
                        model.load_adapter(
                            adapter_name=adapter_name,
                            peft_config=LoraConfig(**part.config),
                            adapter_state_dict=dict(part.state_dict),
                        )

    def _activate(self, entries: Sequence[ActiveLora]) -> None:
        """Make exactly ``entries`` active, each at its weight (per component: the adapters it has)."""
        from diffusers.loaders.lora_base import set_adapters_for_text_encoder

        for component, model in self._models.items():
            chosen = [entry for entry in entries if component in entry.components]
            if not chosen:
                continue
            names = [entry.adapter_name for entry in chosen]
            weights = [entry.weight for entry in chosen]
            if component == "unet":
                model.set_adapters(names, weights)
            else:
                set_adapters_for_text_encoder(names, model, weights)

    def _delete(self, adapter_names: Sequence[str]) -> None:
        """Delete adapters (also half-injected ones); a model left without adapters gets its own modules
        back and loses peft's bookkeeping attributes."""
        from diffusers.utils.peft_utils import delete_adapter_layers, recurse_remove_peft_layers

        for model in self._models.values():
            config = model.__dict__.get("peft_config") or {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # peft: "Adapter … was active which is now deleted"
                for name in adapter_names:
                    delete_adapter_layers(model, name)
                    config.pop(name, None)
            remaining = any(module.lora_A for _, module in _tuner_layers(model) if hasattr(module, "lora_A"))
            if not config and not remaining:
                recurse_remove_peft_layers(model)
                model.__dict__.pop("peft_config", None)
                model.__dict__.pop("_hf_peft_config_loaded", None)

    # ---------------------------------------------------------------------------------------------------
    # fusing
    # ---------------------------------------------------------------------------------------------------

    def fuse(self) -> None:
        """Merge the active adapters, at their weights, into the base weights (originals kept on the CPU)."""
        if self.fused or not self._active:
            return
        from diffusers.loaders.lora_base import fuse_text_encoder_lora

        originals = {}
        for component, model in self._models.items():
            for name, module in _tuner_layers(model):
                weight = module.get_base_layer().weight
                originals[(component, name)] = weight.detach().to("cpu", copy=True)
        self._originals = originals
        try:
            for component, model in self._models.items():
                names = [e.adapter_name for e in self._active if component in e.components]
                if not names:
                    continue
                if component == "unet":
                    model.fuse_lora(adapter_names=names)
                else:
                    fuse_text_encoder_lora(model, adapter_names=names)
        except Exception:
            self.unfuse()
            raise

    def unfuse(self) -> None:
        """Undo :meth:`fuse`: peft's layers unmerged, then the saved original weights copied back exactly."""
        if not self.fused:
            return
        from diffusers.loaders.lora_base import unfuse_text_encoder_lora

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns for layers that had nothing merged
            for component, model in self._models.items():
                if component == "unet":
                    model.unfuse_lora()
                else:
                    unfuse_text_encoder_lora(model)
        modules = {component: dict(model.named_modules()) for component, model in self._models.items()}
        with torch.no_grad():
            for (component, name), weight in self._originals.items():
                modules[component][name].get_base_layer().weight.copy_(weight)
        self._originals = None

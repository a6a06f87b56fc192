"""Read LoRA files in the layouts people have into one canonical layout — pure, no model needed.

LoRA (Hu et al. 2021, *LoRA: Low-Rank Adaptation of Large Language Models*, arXiv 2106.09685) adapts a
layer with weight ``W0`` as ``h = W0·x + (α/r)·B·A·x``: ``A`` (``r × in``, "down") and ``B``
(``out × r``, "up"), rank ``r``, scale ``α``. Three file layouts are read:

* **diffusers / peft** — what ``StableDiffusionLoraLoaderMixin.save_lora_weights`` (and, for SDXL,
  ``StableDiffusionXLLoraLoaderMixin.save_lora_weights``) writes (``pytorch_lora_weights.safetensors``):
  ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``, ``text_encoder.<module>…`` and SDXL's
  ``text_encoder_2.<module>…``; older diffusers files (``…processor.to_q_lora.down.weight``,
  ``…lora_linear_layer.up.weight``) too. ``α`` per module comes from the ``lora_adapter_metadata`` header
  entry (diffusers ≥ 0.35 writes each component's peft ``LoraConfig`` there: ``lora_alpha``,
  ``alpha_pattern``, ``use_rslora``); without it ``α = r`` (diffusers' convention: ``B·A`` is the delta).
* **kohya** (sd-scripts; what A1111, ComfyUI and Civitai use) —
  ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (a scalar
  per module; ``α = r`` when absent), ``lora_te_`` (or ``lora_te1_``) for the (first) text encoder and,
  for SDXL, ``lora_te2_`` for ``text_encoder_2``. UNet modules are named after diffusers' UNet
  (``lora_unet_down_blocks_1_attentions_0_…``, what sd-scripts writes for SD 1.x/2.x) or after the
  original sgm/LDM UNet that sd-scripts trains SDXL on (``lora_unet_input_blocks_4_1_…``,
  ``lora_unet_middle_block_1_…``, ``lora_unet_output_blocks_0_1_…``, ``lora_unet_label_emb_0_0``).
* **safelatent** — the diffusers/peft layout plus a ``safelatent`` JSON entry in the safetensors header
  (``trigger_words``, ``rank``, ``alpha``, ``base_model_hash``, …); ``α`` from ``lora_adapter_metadata``
  as above, else the entry's ``alpha``. :func:`save_lora` writes it.

Key names are converted by diffusers' own functions — ``StableDiffusionXLLoraLoaderMixin.lora_state_dict``
(kohya → diffusers: sgm block names via ``_maybe_map_sgm_blocks_to_diffusers``, given the UNet's
``layers_per_block``, then ``_convert_non_diffusers_lora_to_diffusers``; for files without sgm names the
same conversion as ``StableDiffusionLoraLoaderMixin.lora_state_dict``), ``convert_unet_state_dict_to_peft``
and ``convert_state_dict_to_peft`` — module by module (one kohya module per call, so a file that mixes
sgm and diffusers block names keeps every module, where diffusers' whole-file call drops the sgm ones),
so every converted module remembers the file key it came from (errors name the file's keys). ``α`` is
resolved here per module with peft's own pattern rule (``peft.utils.other.get_pattern_key``) rather than
by diffusers' ``get_peft_kwargs``, whose ``alpha_pattern`` for kohya attention layers names no module
(``…processor.to_q_lora.down.weight``) when alphas differ between modules.

Files are local paths only. ``.safetensors`` is preferred; ``.pt``/``.bin``/``.pth``/``.ckpt`` are read only
with ``torch.load(weights_only=True)`` — a pickle that needs more is refused, never unpickled.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from ...errors import InvalidWeightsError, ModelFormatError, ModelNotFoundError
from ..loading import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    first_line,
    has_non_finite,
    unsafe_checkpoint,
    unwrap_state_dict,
)
from .identity import lora_hash

__all__ = [
    "COMPONENTS",
    "FORMATS",
    "LORA_ADAPTER_METADATA_KEY",
    "SAFELATENT_METADATA_KEY",
    "LoraFile",
    "read_lora",
    "save_lora",
]

FORMATS = ("diffusers", "kohya", "safelatent")
#: The components a LoRA can adapt, as key prefixes of the canonical layout (``text_encoder_2``: SDXL's
#: second text encoder, OpenCLIP bigG as transformers' ``CLIPTextModelWithProjection``).
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
#: Text-encoder modules outside ``text_model.``: the projection of ``CLIPTextModelWithProjection``.
_TEXT_TOP_LEVEL = ("text_model.", "text_projection.")
#: Header entry with diffusers' per-component peft ``LoraConfig`` (``save_lora_weights(..._metadata=)``).
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
#: Header entry (JSON) that marks a safelatent file: trigger words, rank, alpha, base model hash, ...
SAFELATENT_METADATA_KEY = "safelatent"
#: Folder layout ``save_lora_weights`` writes.
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

_A, _B = ".lora_A.weight", ".lora_B.weight"
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
_UNET_TOP_LEVEL = (
    "down_blocks.",
    "mid_block.",
    "up_blocks.",
    "conv_in.",
    "conv_out.",
    "time_embedding.",
    "add_embedding.",
)
#: ``layers_per_block`` of the UNet that kohya's sgm block names (``input_blocks_<i>``) count in when no
#: model config is given: SDXL base and refiner (sd-scripts writes sgm names for SDXL only).
SGM_LAYERS_PER_BLOCK = 2
#: Key fragments of other model families: (fragment, what it means).
_FOREIGN = (
    ("transformer.", "a transformer-based model (SD 3, Flux, ...)"),
    ("lora_transformer_", "a transformer-based model (SD 3, Flux, ...)"),
    ("double_blocks", "Flux"),
    ("single_blocks", "Flux"),
    ("single_transformer_blocks", "Flux"),
    ("diffusion_model.", "a transformer-based model (SD 3, Flux, ...)"),
)
_UNSUPPORTED = (
    (".hada_", "a LyCORIS LoHa adapter"),
    (".lokr_", "a LyCORIS LoKr adapter"),
    ("lora_mid", "a LyCORIS LoCon adapter with a Tucker-decomposed middle"),
    ("dora_scale", "a DoRA adapter"),
    ("lora_magnitude_vector", "a DoRA adapter"),
)


@dataclass(frozen=True)
class LoraFile:
    """One LoRA file, read and converted to the canonical layout.

    ``state_dict`` keys are ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight`` with component
    ``unet``, ``text_encoder`` or (SDXL) ``text_encoder_2`` and diffusers' ``UNet2DConditionModel`` /
    transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` module names (text-encoder names as in
    the file, usually starting ``text_model.``).
    ``network_alphas`` maps every ``<component>.<module>`` to its ``α`` (so the module's scale is
    ``α / r`` with ``r = lora_A.shape[0]``). ``metadata`` is the safetensors header (``__metadata__``,
    without ``format``); ``info`` the parsed ``safelatent`` entry (empty for other formats); ``hash`` the
    A1111 "autov3" short hash (:mod:`.identity`); ``source_keys`` maps each ``lora_A`` key to the file key
    it came from.
    """

    path: Path
    format: str
    state_dict: dict[str, torch.Tensor]
    network_alphas: dict[str, float]
    metadata: dict[str, str]
    hash: str
    info: dict[str, Any] = field(default_factory=dict)
    source_keys: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def modules(self) -> list[str]:
        """``<component>.<module>`` for every adapted layer, in file order."""
        return [key[: -len(_A)] for key in self.state_dict if key.endswith(_A)]

    @property
    def ranks(self) -> dict[str, int]:
        return {module: int(self.state_dict[module + _A].shape[0]) for module in self.modules}

    @property
    def components(self) -> tuple[str, ...]:
        present = {module.split(".", 1)[0] for module in self.modules}
        return tuple(c for c in COMPONENTS if c in present)

    @property
    def trigger_words(self) -> list[str]:
        words = self.info.get("trigger_words", self.info.get("trigger_word"))
        if isinstance(words, str):
            return [words] if words else []
        if isinstance(words, list | tuple):
            return [str(w) for w in words if str(w)]
        return []

    @property
    def base_model_hash(self) -> str | None:
        value = self.info.get("base_model_hash")
        return str(value) if value else None

    def source_key(self, module: str) -> str:
        """The file's own key for ``<component>.<module>`` (its down / ``lora_A`` weight)."""
        return self.source_keys.get(module + _A, module + _A)


# --------------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------------


def read_lora(path: str | os.PathLike, *, unet_config: Any = None) -> LoraFile:
    """Read a local LoRA file (or a folder holding ``pytorch_lora_weights.safetensors``).

    Detects the layout (``diffusers``, ``kohya``, ``safelatent``), converts it to the canonical layout of
    :class:`LoraFile` and checks what needs no model: known layout and architecture, every ``lora_A``
    paired with a ``lora_B`` of the same rank, finite values. ``unet_config`` (anything with an int
    ``layers_per_block``, e.g. the UNet's ``config``, as diffusers' ``load_lora_weights`` passes it) says
    how kohya's sgm block numbers (``input_blocks_<i>``) map to diffusers' blocks; default
    :data:`SGM_LAYERS_PER_BLOCK` (SDXL). Raises :class:`ModelNotFoundError`,
    :class:`ModelFormatError` (unreadable file, unknown layout, another architecture),
    :class:`~safelatent.errors.UnsafeCheckpointError` and :class:`InvalidWeightsError` (NaN/inf, ranks),
    each naming the file and its first offending keys.
    """
    resolved = _resolve(path)
    tensors, header = _read_tensors(resolved)
    where = resolved.name
    _check_layout(tensors, where)
    info = _safelatent_info(header, where)
    if all(key.startswith(_KOHYA_PREFIXES) for key in tensors):
        fmt = "kohya"
        state_dict, alphas, origin = _from_kohya(tensors, where, _sgm_config(unet_config))
    else:
        fmt = "safelatent" if SAFELATENT_METADATA_KEY in header else "diffusers"
        state_dict, origin = _from_diffusers(tensors, where)
        alphas = _diffusers_alphas(state_dict, header, info, where)
    _check_tensors(state_dict, alphas, origin, where)
    return LoraFile(
        path=resolved,
        format=fmt,
        state_dict=state_dict,
        network_alphas=alphas,
        metadata=header,
        hash=lora_hash(resolved),
        info=info,
        source_keys={key: origin[key] for key in state_dict if key.endswith(_A)},
    )


def read_lora_info(path: str | os.PathLike) -> dict[str, Any]:
    """The ``safelatent`` header entry of a LoRA file (trigger words, training settings, an erasure's
    concept …; ``{}`` when it has none) — the header alone, no tensor is read."""
    resolved = _resolve(path)
    if resolved.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return {}  # weights-only pickles carry no header
    from safetensors import safe_open

    try:
        with safe_open(str(resolved), framework="pt", device="cpu") as handle:
            header = dict(handle.metadata() or {})
    except Exception as error:  # SafetensorError, OSError, ValueError
        raise _unreadable_safetensors(resolved, error) from None
    return _safelatent_info(header, resolved.name)


def _unreadable_safetensors(path: Path, error: Exception) -> ModelFormatError:
    return ModelFormatError(
        f"LoRA {path.name} is not a readable .safetensors file ({first_line(error)})",
        "the file may be truncated (an incomplete download) or not a safetensors file; get it again",
    )


def _resolve(path: str | os.PathLike) -> Path:
    resolved = Path(os.fspath(path)).expanduser()
    if resolved.is_dir() and (resolved / DIFFUSERS_WEIGHT_NAME).is_file():
        return resolved / DIFFUSERS_WEIGHT_NAME
    if resolved.is_dir():
        raise ModelFormatError(
            f"LoRA path {resolved} is a folder without {DIFFUSERS_WEIGHT_NAME}",
            "pass the LoRA file itself (a .safetensors file)",
        )
    if not resolved.is_file():
        raise ModelNotFoundError(
            f"no such LoRA file: {os.fspath(path)}",
            "pass a local .safetensors file; safelatent never downloads adapters",
        )
    return resolved


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata (``format`` dropped) of a safetensors or weights-only pickle."""
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                header = dict(handle.metadata() or {})
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except Exception as error:  # SafetensorError, OSError, ValueError
            raise _unreadable_safetensors(path, error) from None
        header.pop("format", None)
        return tensors, header
    if suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise unsafe_checkpoint(str(path), error) from None
        except (RuntimeError, OSError, EOFError, ValueError, AttributeError, ImportError) as error:
            raise ModelFormatError(
                f"cannot read LoRA {path.name} as a PyTorch file ({first_line(error)})",
                "the file may be truncated or not a LoRA; prefer a .safetensors file",
            ) from None
        return unwrap_state_dict(obj, str(path)), {}
    raise ModelFormatError(
        f"LoRA {path.name}: unknown file type {path.suffix or '(no extension)'!r}",
        "pass a .safetensors LoRA (.pt/.bin are read as weights only)",
    )


def _first(keys, n: int = 3) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _check_layout(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse empty files, other model families and unsupported adapter kinds from the key names alone."""
    if not tensors:
        raise ModelFormatError(f"LoRA {where} holds no tensors", "pass a LoRA file with lora weights")
    foreign = {key: family for key in tensors for fragment, family in reversed(_FOREIGN) if fragment in key}
    if foreign:
        family = next(iter(foreign.values()))
        raise ModelFormatError(
            f"LoRA {where} is an adapter for {family}, not Stable Diffusion 1.x, 2.x or XL "
            f"(keys {_first(foreign)})",
            "use a LoRA trained for the Stable Diffusion model you loaded (SD 1.x, SD 2.x or SDXL)",
        )
    for fragment, kind in _UNSUPPORTED:
        hits = [key for key in tensors if fragment in key]
        if hits:
            raise ModelFormatError(
                f"LoRA {where} is {kind}, which safelatent does not load (keys {_first(hits)})",
                "use a plain LoRA (lora_down/lora_up or lora_A/lora_B weights)",
            )


def _unknown_keys_error(where: str, keys, why: str) -> ModelFormatError:
    return ModelFormatError(
        f"LoRA {where} has {len(list(keys))} key(s) {why}: {_first(keys)}",
        "pass a LoRA for Stable Diffusion (1.x, 2.x or XL) in the diffusers/peft (unet.…lora_A.weight) or "
        "kohya (lora_unet_…lora_down.weight) layout",
    )


def _peft_key(component: str, key: str) -> str:
    """One ``<module>.lora_A|B.weight`` key in peft naming, converted by diffusers' own mapping tables."""
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if component == "unet":
        return next(iter(convert_unet_state_dict_to_peft({key: None})))
    if ".lora_A." in key or ".lora_B." in key:
        return key
    # The text-encoder table of old diffusers files (``to_q_lora``) also maps ``lora_linear_layer``; the
    # newer table maps ``text_projection.lora.down`` (what kohya's ``lora_te2_text_projection`` becomes).
    converted = next(iter(convert_state_dict_to_peft({key: None}, original_type=StateDictType.DIFFUSERS_OLD)))
    return next(iter(convert_state_dict_to_peft({converted: None}, original_type=StateDictType.DIFFUSERS)))


def _from_diffusers(
    tensors: Mapping[str, torch.Tensor], where: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers/peft (and old diffusers) keys → canonical keys, and canonical key → file key."""
    prefixed = any(key.startswith(tuple(f"{c}." for c in COMPONENTS)) for key in tensors)
    if not prefixed and all(key.startswith(_UNET_TOP_LEVEL) for key in tensors):
        tensors = {f"unet.{key}": value for key, value in tensors.items()}  # a bare UNet adapter
        origin_of = {f"unet.{key}": key for key in tensors}
    else:
        origin_of = {key: key for key in tensors}
    unknown = [key for key in tensors if key.split(".", 1)[0] not in COMPONENTS]
    if unknown:
        raise _unknown_keys_error(where, unknown, "outside the unet/text_encoder/text_encoder_2 components")
    state_dict: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in tensors.items():
        component, rest = key.split(".", 1)
        canonical = f"{component}.{_peft_key(component, rest)}"
        if canonical in state_dict:
            raise ModelFormatError(
                f"LoRA {where} has two keys for one weight: {origin[canonical]!r} and {origin_of[key]!r}",
                "the file is inconsistent; re-export it",
            )
        state_dict[canonical] = value
        origin[canonical] = origin_of[key]
    not_lora = [origin[key] for key in state_dict if not key.endswith((_A, _B))]
    if not_lora:
        raise _unknown_keys_error(where, not_lora, "that are not LoRA down/up weights (lora_A/lora_B)")
    return state_dict, origin


def _sgm_config(unet_config: Any) -> Any:
    """What ``_maybe_map_sgm_blocks_to_diffusers`` reads of a UNet config (``layers_per_block``)."""
    from types import SimpleNamespace

    layers = getattr(unet_config, "layers_per_block", None)
    if layers is None and isinstance(unet_config, Mapping):
        layers = unet_config.get("layers_per_block")
    if isinstance(layers, bool) or not isinstance(layers, int):
        layers = SGM_LAYERS_PER_BLOCK  # per-block lists exist only in UNets kohya does not train
    return SimpleNamespace(layers_per_block=layers)


def _from_kohya(
    tensors: Mapping[str, torch.Tensor], where: str, unet_config: Any
) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, str]]:
    """kohya keys → canonical keys, per-module ``α`` (``.alpha``, else the rank), canonical → file key.

    One ``StableDiffusionXLLoraLoaderMixin.lora_state_dict`` call per module: sgm block names
    (``input_blocks_4_1_…``) are mapped by ``_maybe_map_sgm_blocks_to_diffusers(…, unet_config)``, then
    ``_convert_non_diffusers_lora_to_diffusers`` names the module (``lora_te2_`` → ``text_encoder_2.``).
    """
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        if part in _KOHYA_PARTS:
            groups.setdefault(name, {})[part] = value
        else:
            unknown.append(key)
    if unknown:
        raise _unknown_keys_error(where, unknown, "that are not kohya lora_down/lora_up/alpha entries")
    pair = {"lora_down.weight", "lora_up.weight"}
    unpaired = [f"{name}.{next(iter(parts))}" for name, parts in groups.items() if not pair <= parts.keys()]
    if unpaired:
        raise _unknown_keys_error(where, unpaired, "without their lora_down/lora_up partner")
    state_dict: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    origin: dict[str, str] = {}
    for name, parts in groups.items():
        down_key, up_key = f"{name}.lora_down.weight", f"{name}.lora_up.weight"
        try:
            converted, _ = StableDiffusionXLLoraLoaderMixin.lora_state_dict(
                {down_key: parts["lora_down.weight"], up_key: parts["lora_up.weight"]},
                unet_config=unet_config,
            )
        except (ValueError, KeyError, IndexError) as error:  # e.g. "Invalid middle block id 3."
            raise _unknown_keys_error(
                where, [down_key], f"that diffusers cannot map to a layer ({first_line(error)})"
            ) from None
        pair_keys = {}
        for key, value in converted.items():
            component, rest = key.split(".", 1)
            canonical = f"{component}.{_peft_key(component, rest)}"
            if component not in COMPONENTS or not canonical.endswith((_A, _B)):
                raise _unknown_keys_error(where, [down_key], f"that convert to no single layer ({key!r})")
            if canonical in state_dict:  # e.g. the same layer under its sgm and its diffusers name
                raise ModelFormatError(
                    f"LoRA {where} has two keys for one weight: {origin[canonical]!r} and "
                    f"{down_key if canonical.endswith(_A) else up_key!r}",
                    "the file is inconsistent; re-export it",
                )
            pair_keys[canonical] = value
        if sorted(key[-len(_A) :] for key in pair_keys) != sorted((_A, _B)):
            raise _unknown_keys_error(where, [down_key], "that convert to no single layer")
        for canonical, value in pair_keys.items():
            state_dict[canonical] = value
            origin[canonical] = down_key if canonical.endswith(_A) else up_key
        module = next(key for key in pair_keys if key.endswith(_A))[: -len(_A)]
        rank = int(parts["lora_down.weight"].shape[0])
        alpha = parts.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            raise InvalidWeightsError(
                f"LoRA {where}: {name}.alpha holds {alpha.numel()} values, not one", "re-export the LoRA"
            )
        alphas[module] = float(alpha.float().item()) if alpha is not None else float(rank)
    return state_dict, alphas, origin


def _json_header_entry(header: Mapping[str, str], key: str, where: str, hint: str) -> dict[str, Any]:
    """The JSON object stored under ``key`` in a safetensors header (``{}`` when absent or empty)."""
    raw = header.get(key)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        message = f"LoRA {where}: the {key!r} header entry is not JSON ({error})"
        raise ModelFormatError(message, hint) from None
    if not isinstance(value, dict):
        raise ModelFormatError(f"LoRA {where}: the {key!r} header entry is not a JSON object", hint)
    return value


def _safelatent_info(header: Mapping[str, str], where: str) -> dict[str, Any]:
    return _json_header_entry(header, SAFELATENT_METADATA_KEY, where, "re-export the adapter with safelatent")


def _component_configs(header: Mapping[str, str], where: str) -> dict[str, dict[str, Any]]:
    """The per-component peft ``LoraConfig`` kwargs in ``lora_adapter_metadata`` (``{}`` when absent)."""
    packed = _json_header_entry(header, LORA_ADAPTER_METADATA_KEY, where, "re-export the LoRA")
    configs: dict[str, dict[str, Any]] = {}
    for key, value in packed.items():
        component, _, option = str(key).partition(".")
        if component in COMPONENTS and option:
            configs.setdefault(component, {})[option] = value
    return configs


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ModelFormatError(
            f"LoRA {where}: {what} is {value!r}, not a finite number", "re-export the LoRA"
        )
    return float(value)


def _alpha_from_config(config: Mapping[str, Any], module: str, rank: int, where: str) -> float:
    """``α`` of one module under a peft ``LoraConfig`` (``alpha_pattern`` matched as peft matches it),
    as the value that gives peft's scale with ``α / r`` (``use_rslora`` scales by ``α / √r``)."""
    from peft.utils.other import get_pattern_key

    if config.get("use_dora"):
        raise ModelFormatError(
            f"LoRA {where} is a DoRA adapter (use_dora in its metadata), which safelatent does not load",
            "use a plain LoRA",
        )
    patterns = config.get("alpha_pattern") or {}
    alpha = config.get("lora_alpha", 8)
    names = [module, module.removeprefix("text_model.")]
    for name in names:
        key = get_pattern_key(list(patterns), name)
        if key in patterns:
            alpha = patterns[key]
            break
    alpha = _number(alpha, f"lora_alpha of {module}", where)
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _diffusers_alphas(
    state_dict: Mapping[str, torch.Tensor], header: Mapping[str, str], info: Mapping[str, Any], where: str
) -> dict[str, float]:
    configs = _component_configs(header, where)
    fallback = info.get("alpha")
    alphas = {}
    for key, value in state_dict.items():
        if not key.endswith(_A):
            continue
        module = key[: -len(_A)]
        component, name = module.split(".", 1)
        rank = int(value.shape[0])
        if component in configs:
            alphas[module] = _alpha_from_config(configs[component], name, rank, where)
        elif fallback is not None:
            alphas[module] = _number(fallback, "the safelatent entry's alpha", where)
        else:
            alphas[module] = float(rank)
    return alphas


def _check_tensors(
    state_dict: Mapping[str, torch.Tensor], alphas: Mapping[str, float], origin: Mapping[str, str], where: str
) -> None:
    """Every A has its B (same rank, Linear- or Conv-shaped), all values finite."""
    unpaired = [
        origin[key]
        for key in state_dict
        if (key.endswith(_A) and key[: -len(_A)] + _B not in state_dict)
        or (key.endswith(_B) and key[: -len(_B)] + _A not in state_dict)
    ]
    if unpaired:
        raise _unknown_keys_error(where, unpaired, "without their lora_A/lora_B (down/up) partner")
    bad_rank = []
    for key, down in state_dict.items():
        if not key.endswith(_A):
            continue
        up = state_dict[key[: -len(_A)] + _B]
        linear = down.ndim == 2 and up.ndim == 2
        conv = down.ndim == 4 and up.ndim == 4 and tuple(up.shape[2:]) == (1, 1)
        if not (linear or conv) or down.shape[0] != up.shape[1] or down.shape[0] == 0:
            bad_rank.append(f"{origin[key]} {tuple(down.shape)} with up {tuple(up.shape)}")
    if bad_rank:
        raise InvalidWeightsError(
            f"LoRA {where}: down/up weights whose shapes do not make a rank-r pair: {_first(bad_rank)}",
            "the file is corrupted or not a LoRA; re-export it",
        )
    not_float = [origin[key] for key, value in state_dict.items() if not value.is_floating_point()]
    if not_float:
        raise InvalidWeightsError(
            f"LoRA {where}: non-float weights {_first(not_float)}", "re-export the LoRA"
        )
    non_finite = [origin[key] for key, value in state_dict.items() if has_non_finite(value)]
    non_finite += [f"{module} alpha" for module, alpha in alphas.items() if not math.isfinite(alpha)]
    if non_finite:
        raise InvalidWeightsError(
            f"LoRA {where} contains NaN or inf values in {_first(non_finite)}",
            "the adapter is corrupted (or overflowed when saved in fp16): re-export or re-train it",
        )


# --------------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def save_lora(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    *,
    configs: Mapping[str, Any] | None = None,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write a LoRA in the diffusers/peft layout — the safelatent format when ``info`` is given.

    ``state_dict``: canonical keys (``unet.<module>.lora_A.weight``, ``text_encoder.<module>…`` and SDXL's
    ``text_encoder_2.<module>…``, the layout of ``StableDiffusionXLLoraLoaderMixin.save_lora_weights``; text
    encoder modules are written with the ``text_model.`` prefix that diffusers and A1111 converters expect,
    except ``CLIPTextModelWithProjection``'s top-level ``text_projection``).
    ``configs``: per component, its peft ``LoraConfig`` (or ``LoraConfig.to_dict()``), stored like
    ``save_lora_weights(..., unet_lora_adapter_metadata=...)`` does in ``lora_adapter_metadata`` so ``α``
    per module is kept. ``info``: the ``safelatent`` entry (e.g. ``trigger_words``, ``rank``, ``alpha``,
    ``base_model_hash``).
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    for key, value in state_dict.items():
        component, _, rest = key.partition(".")
        if component not in COMPONENTS or not key.endswith((_A, _B)):
            raise ModelFormatError(
                f"cannot save key {key!r}",
                "keys must be unet.<module>.lora_A|B.weight, text_encoder.… or text_encoder_2.…",
            )
        if component != "unet" and not rest.startswith(_TEXT_TOP_LEVEL):
            key = f"{component}.text_model.{rest}"
        tensors[key] = value.detach().contiguous().cpu()
    header = {"format": "pt"}
    if configs:
        packed = {}
        for component, config in configs.items():
            as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            packed.update({f"{component}.{k}": v for k, v in _jsonable(as_dict).items()})
        header[LORA_ADAPTER_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    if info is not None:
        header[SAFELATENT_METADATA_KEY] = json.dumps(_jsonable(info), sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)
    return path

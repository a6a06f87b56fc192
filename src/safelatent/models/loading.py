"""Load Stable Diffusion weights from a local path — a diffusers folder or one checkpoint file — offline.

Implements part 1 of issue 2 ("Load offline from a local path, never a hub id"):

* **diffusers-layout folders** (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/``, as written by ``StableDiffusionPipeline.save_pretrained``): each model
  with its library's own ``from_pretrained(<local folder>, local_files_only=True)``.
* **single-file checkpoints** in the original Stable Diffusion (LDM/CompVis) key layout, SD 1.x: the
  architecture is recognised from the keys (:mod:`.detect`), the keys are converted with diffusers' own
  functions ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` /
  ``convert_ldm_clip_checkpoint`` (``diffusers.loaders.single_file_utils``), and loaded with
  ``load_state_dict(strict=True)`` into models built from the configs that ship in the package (or a
  caller's ``config_dir``). Those three functions are pure dict transformations: unlike
  ``from_single_file`` they never resolve a config, so this path cannot reach a hub by construction.
* ``.ckpt`` / ``.bin`` / ``.pt`` / ``.pth`` only through ``torch.load(weights_only=True)``; a file that
  needs more than tensors to unpickle is refused (:class:`UnsafeCheckpointError`), never unpickled.

Everything runs inside :func:`~safelatent.models.offline.offline_mode`, so any hub request a library might
still attempt fails before a socket opens (:class:`OfflineViolationError`). Every loaded tensor is checked
for NaN/inf. ``model_hash`` is AUTOMATIC1111's "Model hash" (first 10 hex digits of the file's SHA-256) for
a single file, and the same over the unet/vae/text_encoder weight files of a folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..errors import (
    InvalidArgumentError,
    InvalidWeightsError,
    ModelFormatError,
    ModelNotFoundError,
    OfflineViolationError,
    UnsafeCheckpointError,
)
from ..sampling.prediction import PREDICTION_TYPES
from .components import StableDiffusionComponents
from .detect import ARCHITECTURE_NAMES, component_description, detect_folder_architecture, detect_single_file
from .offline import offline_mode
from .shipped import shipped_config_dir
from .tokenizer import CLIP_EOS_TOKEN as CLIP_EOS
from .tokenizer import CLIP_MAX_LENGTH, CleanCLIPTokenizer, load_clip_tokenizer

__all__ = [
    "FOLDER_COMPONENTS",
    "PICKLE_SUFFIXES",
    "SAFETENSORS_SUFFIXES",
    "file_sha256",
    "folder_weight_files",
    "load_components",
]

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
#: Pickle-based checkpoint formats, read only with ``torch.load(weights_only=True)``.
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
#: The sub-folders of a complete diffusers Stable Diffusion folder.
FOLDER_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_MODEL_COMPONENTS = ("unet", "vae", "text_encoder")
#: Weight-bearing components of any supported folder (SDXL adds the second text encoder).
_WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")

_COMPLETE_FOLDER = (
    "a complete diffusers Stable Diffusion folder (as StableDiffusionPipeline.save_pretrained writes it) "
    "contains model_index.json, unet/, vae/ and text_encoder/ (each a config.json plus weights), "
    "tokenizer/ and scheduler/"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_VARIANT = re.compile(r"\.(fp16|bf16|fp32|non_ema|ema)(?=[.-])")
_HASH_CHUNK = 4 * 1024 * 1024
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


# --------------------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------------------


def load_components(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    config_dir: str | os.PathLike | None = None,
    prediction_type: str | None = None,
    vae: str | os.PathLike | None = None,
) -> StableDiffusionComponents:
    """Load a Stable Diffusion model from a local folder or file, without any network access.

    ``path`` is a diffusers-layout folder or a single ``.safetensors`` / ``.ckpt`` / ``.bin`` / ``.pt``
    checkpoint in the original Stable Diffusion key layout — SD 1.x, SD 2.x or SDXL base, recognised from
    the keys. ``config_dir`` (single files only) is a diffusers-layout folder of configs without weights
    (``unet/config.json``, ``vae/config.json``, ``text_encoder/config.json`` [, ``text_encoder_2/``],
    optionally ``scheduler/`` and ``tokenizer/``) that replaces the shipped configs of the family — for
    models with other widths. ``prediction_type`` (``"epsilon"``, ``"v_prediction"``, ``"sample"``)
    overrides the scheduler's; an SD 2.x single file does not record it, and is taken as the 768-px
    v-prediction model unless ``prediction_type="epsilon"`` (the 512-px base model). ``vae`` replaces the
    VAE with a diffusers VAE folder (``config.json`` + weights), e.g. an fp16-safe SDXL VAE; a VAE whose
    config says ``force_upcast`` runs in float32 when ``dtype`` is float16. The models are returned
    in ``eval()`` mode with gradients off, on ``device`` in ``dtype``.

    Raises :class:`ModelNotFoundError` (no such path; hub ids are never resolved),
    :class:`ModelFormatError` (incomplete folder, unknown keys or extension, unsupported architecture),
    :class:`UnsafeCheckpointError` (a pickle that would run code), :class:`InvalidWeightsError` (NaN/inf)
    and :class:`OfflineViolationError` (a library tried to reach a hub).
    """
    device = check_device(device)
    dtype = check_dtype(dtype)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise InvalidArgumentError(
            f"unknown prediction_type {prediction_type!r}", f"use one of {', '.join(PREDICTION_TYPES)}"
        )
    source = os.fspath(path)
    resolved = _resolve_model_path(path)
    vae_folder = _vae_folder(vae) if vae is not None else None
    configs = Path(config_dir).expanduser() if config_dir is not None else None
    if configs is not None and not configs.is_dir():
        raise ModelNotFoundError(
            f"config_dir {os.fspath(config_dir)} is not a folder",
            "pass a diffusers-layout folder with unet/config.json, vae/config.json and "
            "text_encoder/config.json",
        )

    from huggingface_hub.errors import OfflineModeIsEnabled

    with offline_mode(), library_progress_bars_off():
        try:
            if resolved.is_dir():
                if configs is not None:
                    logger.warning(
                        "config_dir is ignored for a diffusers folder (%s has its own configs)", source
                    )
                components = _load_folder(resolved, source, device, dtype, prediction_type)
            else:
                components = _load_single_file(resolved, source, device, dtype, configs, prediction_type)
            if vae_folder is not None:
                _replace_vae(components, vae_folder, device, dtype)
            return components
        except OfflineModeIsEnabled as error:
            raise OfflineViolationError(
                f"loading {source} tried to contact a model hub ({error})",
                "safelatent never downloads; this is a bug — please report it with the path layout you used",
            ) from error


def _vae_folder(vae: str | os.PathLike) -> Path:
    folder = Path(vae).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"vae {os.fspath(vae)} is not a diffusers VAE folder (a folder with config.json and weights)",
            "pass the VAE's folder, e.g. the fp16-safe SDXL VAE as AutoencoderKL.save_pretrained writes it "
            "(config.json + diffusion_pytorch_model.safetensors)",
        )
    return folder


def _replace_vae(
    components: StableDiffusionComponents, folder: Path, device: torch.device, dtype: torch.dtype
) -> None:
    """Swap in the VAE of ``folder``; its hash goes to ``extra["vae_hash"]`` (A1111's "VAE hash")."""
    from diffusers import AutoencoderKL

    vae = _from_pretrained(AutoencoderKL, folder, "vae", dtype)
    _check_finite(vae.state_dict().items(), str(folder))
    theirs, ours = vae.config, components.vae.config
    fits = {
        "block_out_channels": tuple(theirs.block_out_channels) == tuple(ours.block_out_channels),
        "latent_channels": int(theirs.latent_channels) == int(ours.latent_channels),
        # the latent scale tells the families apart (SD 1.x/2.x 0.18215, SDXL 0.13025): a VAE of another
        # family would decode at the wrong scale without any error
        "scaling_factor": float(theirs.scaling_factor) == float(ours.scaling_factor),
        "shift_factor": (getattr(theirs, "shift_factor", None) or 0.0)
        == (getattr(ours, "shift_factor", None) or 0.0),
    }
    misfit = [name for name, ok in fits.items() if not ok]
    if misfit:
        raise ModelFormatError(
            f"the VAE in {folder} does not fit this {components.architecture} model (other "
            f"{', '.join(misfit)}: e.g. scaling_factor {theirs.scaling_factor} vs {ours.scaling_factor})",
            "use a VAE made for this model family (an SDXL VAE for SDXL, an SD 1.x/2.x VAE for those)",
        )
    components.vae = _finalize(vae, device, vae_dtype(vae, dtype, components.architecture))
    components.extra["vae"] = str(folder)
    components.extra["vae_hash"] = file_sha256(_component_weights(folder)[0])[:10]


@contextmanager
def library_progress_bars_off():
    """Silence transformers' and diffusers' per-file "Loading weights" bars while loading (restored after)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [(lib, lib.is_progress_bar_enabled()) for lib in (transformers_logging, diffusers_logging)]
    for lib, _ in states:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in states:
            if enabled:
                lib.enable_progress_bar()


# --------------------------------------------------------------------------------------------------------
# arguments and paths
# --------------------------------------------------------------------------------------------------------


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, or an error that lists valid names."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise InvalidArgumentError(
            f"unknown device {device!r} ({error})", "use 'cpu', 'cuda', 'cuda:0', 'mps', ..."
        ) from None


def check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``dtype`` as a floating-point ``torch.dtype`` (names and aliases: float32/fp32, float16/fp16/half,
    bfloat16/bf16)."""
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise InvalidArgumentError(
                f"unknown dtype {dtype!r}", f"use one of {', '.join(sorted(set(_DTYPES)))}"
            )
        return _DTYPES[dtype.lower()]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgumentError(
            f"dtype must be a floating-point torch.dtype, got {dtype!r}",
            "use torch.float32, torch.float16 or torch.bfloat16",
        )
    return dtype


def _resolve_model_path(path: str | os.PathLike) -> Path:
    """The existing local path, or :class:`ModelNotFoundError` that says what to pass instead."""
    text = os.fspath(path)
    resolved = Path(text).expanduser()
    if resolved.exists():
        return resolved
    if _HUB_ID.match(text) and not text.lower().endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
        raise ModelNotFoundError(
            f"{text!r} is not a local file or folder; it looks like a Hugging Face Hub id",
            "safelatent never downloads models: download the weights yourself and pass the local "
            "diffusers folder or .safetensors file",
        )
    raise ModelNotFoundError(
        f"no such file or folder: {text}",
        "pass a local diffusers folder (with model_index.json) or a Stable Diffusion .safetensors file",
    )


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFormatError(f"cannot read {what} {path}: {error}", "fix or replace the file") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{what} {path} is not a JSON object", "fix or replace the file")
    return data


# --------------------------------------------------------------------------------------------------------
# hashing and weight checks
# --------------------------------------------------------------------------------------------------------


def file_sha256(paths: Iterable[Path]) -> str:
    """Hex SHA-256 over the bytes of ``paths`` in the given order, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def has_non_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds NaN or ±inf — one fast pass, no full-size temporaries.

    Half types are checked on their bits (exponent all ones ⇔ NaN/inf), as element-wise fp16/bf16 math is
    slow on CPUs (``isfinite`` over SD 1.5's 1.07 B fp16 weights takes ~13 s, the bit test ~2 s). Wider
    types use their sum, which is finite whenever every element is (NaN and inf propagate; ``inf - inf``
    is NaN); only a non-finite sum — NaN/inf, or in theory an overflow — is confirmed element-wise.
    """
    if tensor.numel() == 0:
        return False
    if tensor.dtype in (torch.float16, torch.bfloat16):
        exponent_all_ones = 0x7C00 if tensor.dtype == torch.float16 else 0x7F80
        return int((tensor.view(torch.int16) & 0x7FFF).max()) >= exponent_all_ones
    if tensor.dtype in (torch.float32, torch.float64) and bool(torch.isfinite(tensor.sum())):
        return False
    return not bool(torch.isfinite(tensor.float() if tensor.element_size() < 2 else tensor).all())


def _check_finite(named_tensors: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Raise :class:`InvalidWeightsError` naming the first floating-point tensor with NaN or inf."""
    for key, tensor in named_tensors:
        if not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        if has_non_finite(tensor):
            values = tensor.float()
            n_nan = int(torch.isnan(values).sum())
            n_inf = int(torch.isinf(values).sum())
            raise InvalidWeightsError(
                f"tensor {key!r} in {where} contains {n_nan} NaN and {n_inf} inf values",
                "the weights are corrupted (or overflowed when saved in fp16): re-download or re-export "
                "the model, saving in fp32/bf16 if it was converted",
            )


def _finalize(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``eval()``, gradients off, moved to ``device``/``dtype``.

    Models without float32-pinned modules are moved with ``torch.nn.Module.to``: diffusers 0.42's
    ``ModelMixin.to`` warns about "modules that should be kept in float32: []" on every dtype cast.
    """
    model.eval()
    model.requires_grad_(False)
    if getattr(model, "_keep_in_fp32_modules", None):
        return model.to(device=device, dtype=dtype)
    return torch.nn.Module.to(model, device=device, dtype=dtype)


def scheduler_from_config(config: dict, where: str = "scheduler config") -> Any:
    """A diffusers scheduler from a config dict (its ``_class_name``, PNDM when absent)."""
    import diffusers

    name = config.get("_class_name", "PNDMScheduler")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ModelFormatError(
            f"{where} names an unknown scheduler class {name!r}",
            "use a diffusers scheduler config (e.g. PNDMScheduler, DDIMScheduler)",
        )
    return cls.from_config(config)


def _load_folder_tokenizer(tokenizer_dir: Path) -> CleanCLIPTokenizer:
    """The CLIP tokenizer of a ``tokenizer/`` folder, its length forced to CLIP's 77 positions (then
    to the text encoder's context by :func:`_fit_context`)."""
    try:
        tokenizer = CleanCLIPTokenizer.from_pretrained(
            str(tokenizer_dir), local_files_only=True, model_max_length=CLIP_MAX_LENGTH
        )
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ModelFormatError(
            f"cannot load the CLIP tokenizer in {tokenizer_dir}: {first_line(error)}",
            "it needs vocab.json and merges.txt (or tokenizer.json); delete the folder to use the "
            "shipped SD tokenizer instead",
        ) from None
    tokenizer.model_max_length = CLIP_MAX_LENGTH
    return tokenizer


def _fit_context(tokenizer: CleanCLIPTokenizer, text_encoder: torch.nn.Module) -> CleanCLIPTokenizer:
    """Pad and truncate prompts to the text encoder's context: ``max_position_embeddings`` (77 for every
    Stable Diffusion CLIP; shorter for the toy model). A tokenizer config cannot make prompts longer
    than the position table."""
    tokenizer.model_max_length = int(text_encoder.config.max_position_embeddings)
    return tokenizer


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------------------------------------
# diffusers folders
# --------------------------------------------------------------------------------------------------------


def _variant_of(name: str) -> str | None:
    match = _VARIANT.search(name)
    return match.group(1) if match else None


def _component_weights(component_dir: Path) -> tuple[list[Path], str | None]:
    """The weight files ``from_pretrained`` will read in a component folder, and their variant.

    Plain names (``diffusion_pytorch_model.safetensors``, ``model.safetensors``, shards) are preferred;
    a folder holding only ``*.fp16.*`` (or ``bf16``) files is loaded with that variant. Safetensors win
    over ``.bin``, as in diffusers and transformers.
    """
    files = [p for p in component_dir.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin")]
    variants = {_variant_of(p.name) for p in files}
    variant = None
    if None not in variants:
        variant = next((v for v in ("fp16", "bf16", "fp32") if v in variants), None)
    chosen = [p for p in files if _variant_of(p.name) == variant]
    safetensors_files = [p for p in chosen if p.suffix == ".safetensors"]
    return sorted(safetensors_files or chosen), variant


def folder_weight_files(folder: str | os.PathLike) -> list[Path]:
    """The unet/vae/text_encoder(_2) weight files of a diffusers folder, sorted by relative path."""
    folder = Path(folder)
    files: list[Path] = []
    for component in _WEIGHT_COMPONENTS:
        if (folder / component).is_dir():
            files.extend(_component_weights(folder / component)[0])
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _unpickling_error_in(error: BaseException) -> pickle.UnpicklingError | None:
    """The ``pickle.UnpicklingError`` (``torch.load(weights_only=True)`` refusing a global) in an
    exception's cause/context chain, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, pickle.UnpicklingError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _from_pretrained(cls: Any, component_dir: Path, component: str, dtype: torch.dtype) -> Any:
    """``cls.from_pretrained`` on a local component folder, every failure turned into a teaching error."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    weights, variant = _component_weights(component_dir)
    if not weights:
        raise ModelFormatError(
            f"{component_dir} has no weight file (*.safetensors or *.bin)",
            f"copy the {component} weights into it; {_COMPLETE_FOLDER}",
        )
    try:
        model, info = cls.from_pretrained(
            str(component_dir),
            local_files_only=True,
            torch_dtype=dtype,
            variant=variant,
            output_loading_info=True,
        )
    except OfflineModeIsEnabled:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as error:
        refused = _unpickling_error_in(error)
        if refused is not None:  # diffusers wraps torch.load's refusal in an OSError
            raise unsafe_checkpoint(str(weights[0]), refused) from None
        raise ModelFormatError(
            f"cannot load the {component} from {component_dir}: {first_line(error)}",
            f"check that its config.json and weights belong together; {_COMPLETE_FOLDER}",
        ) from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        detail = f"{len(missing)} missing weights (e.g. {', '.join(missing[:3])})" if missing else ""
        if mismatched:
            detail += ("; " if detail else "") + f"{len(mismatched)} with other shapes"
        raise ModelFormatError(
            f"the {component} weights in {component_dir} do not fit its config.json: {detail}",
            "the folder mixes files from different models; re-export it with save_pretrained",
        )
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        logger.warning(
            "%s: ignoring %d unexpected weights (e.g. %s)", component_dir, len(unexpected), unexpected[0]
        )
    return model


def _load_folder(
    folder: Path, source: str, device: torch.device, dtype: torch.dtype, prediction_type: str | None = None
) -> StableDiffusionComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    index_path = folder / "model_index.json"
    model_index = _read_json(index_path, "model_index") if index_path.is_file() else None
    missing = [c for c in _MODEL_COMPONENTS if not (folder / c).is_dir()]
    if missing:
        if model_index is None and len(missing) == len(_MODEL_COMPONENTS):
            checkpoints = sorted(
                p.name for p in folder.iterdir() if p.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
            )
            hint = (
                f"it holds checkpoint file(s) {', '.join(checkpoints[:5])}: pass one of them instead"
                if checkpoints
                else _COMPLETE_FOLDER
            )
            raise ModelFormatError(f"{source} is not a diffusers model folder (no model_index.json)", hint)
        raise ModelFormatError(
            f"{source} is missing {' and '.join(c + '/' for c in missing)}",
            f"copy the missing component(s) from the original model; {_COMPLETE_FOLDER}",
        )
    for component in _MODEL_COMPONENTS:
        if not (folder / component / "config.json").is_file():
            raise ModelFormatError(f"{folder / component} has no config.json", _COMPLETE_FOLDER)
    if model_index is None:
        logger.warning("%s has no model_index.json; loading its unet/, vae/ and text_encoder/ anyway", source)

    unet_config = _read_json(folder / "unet" / "config.json", "UNet config")
    architecture = detect_folder_architecture(model_index, unet_config, source)
    xl = architecture == "sdxl"
    if xl and not (folder / "text_encoder_2" / "config.json").is_file():
        raise ModelFormatError(
            f"{source} is a Stable Diffusion XL folder without text_encoder_2/config.json",
            "copy text_encoder_2/ (config.json + weights) and tokenizer_2/ from the original SDXL model",
        )

    models: dict[str, torch.nn.Module] = {}
    for component, cls in (
        ("unet", UNet2DConditionModel),
        ("vae", AutoencoderKL),
        ("text_encoder", CLIPTextModel),
        *((("text_encoder_2", CLIPTextModelWithProjection),) if xl else ()),
    ):
        model = _from_pretrained(cls, folder / component, component, dtype)
        _check_finite(model.state_dict().items(), f"{folder / component}")
        models[component] = _finalize(
            model, device, vae_dtype(model, dtype, architecture) if component == "vae" else dtype
        )

    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    if scheduler_config.is_file():
        scheduler_dict = _read_json(scheduler_config, "scheduler config")
    else:
        shipped = shipped_config_dir(_shipped_architecture(architecture, unet_config)) / "scheduler"
        logger.warning("%s has no scheduler/scheduler_config.json; using the shipped %s", source, shipped)
        scheduler_config = shipped / "scheduler_config.json"
        scheduler_dict = _read_json(scheduler_config, "scheduler config")
    scheduler = scheduler_from_config(
        _with_prediction_type(scheduler_dict, prediction_type), str(scheduler_config)
    )

    tokenizers = {}
    for name, pad in (
        ("tokenizer", "!" if architecture == "sd2" else CLIP_EOS),
        *((("tokenizer_2", "!"),) if xl else ()),
    ):
        if (folder / name).is_dir():
            tokenizers[name] = _load_folder_tokenizer(folder / name)
        else:
            logger.warning("%s has no %s/; using the shipped CLIP tokenizer", source, name)
            tokenizers[name] = load_clip_tokenizer(pad_token=pad)

    weight_files = folder_weight_files(folder)
    return StableDiffusionComponents(
        unet=models["unet"],
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=_fit_context(tokenizers["tokenizer"], models["text_encoder"]),
        scheduler=scheduler,
        architecture=architecture,
        source=source,
        model_hash=file_sha256(weight_files)[:10],
        extra={"format": "diffusers", "weight_files": [str(p) for p in weight_files]},
        text_encoder_2=models.get("text_encoder_2"),
        tokenizer_2=_fit_context(tokenizers["tokenizer_2"], models["text_encoder_2"]) if xl else None,
        force_zeros_for_empty_prompt=bool((model_index or {}).get("force_zeros_for_empty_prompt", True))
        and xl,
    )


def vae_dtype(vae: torch.nn.Module, dtype: torch.dtype, architecture: str) -> torch.dtype:
    """The dtype the VAE runs in: float32 when an SDXL VAE asks for it in float16.

    SDXL's VAE overflows in fp16 (its config says ``force_upcast: true``; diffusers' SDXL pipeline upcasts
    it to decode); an fp16-safe VAE (e.g. ``madebyollin/sdxl-vae-fp16-fix``, ``force_upcast: false``,
    passed as ``vae=``) runs in fp16. SD 1.x/2.x VAEs run in ``dtype``, as in diffusers'
    ``StableDiffusionPipeline`` (their configs omit ``force_upcast``, whose class default is true)."""
    upcast = architecture == "sdxl" and getattr(vae.config, "force_upcast", False)
    if dtype == torch.float16 and upcast:  # bf16 has float32's range: no overflow, as in diffusers
        return torch.float32
    return dtype


def _shipped_architecture(architecture: str, unet_config: Mapping | None = None) -> str:
    """The shipped config folder for an architecture (SD 2.x: 768-v, or 512-ε for 64×64 latents)."""
    if architecture == "sd2" and unet_config is not None and int(unet_config.get("sample_size", 96)) == 64:
        return "sd2-base"
    return architecture


# --------------------------------------------------------------------------------------------------------
# single-file checkpoints
# --------------------------------------------------------------------------------------------------------


def unsafe_checkpoint(source: str, error: BaseException) -> UnsafeCheckpointError:
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    reason = f"it references {found.group(1)}" if found else first_line(error)
    return UnsafeCheckpointError(
        f"{source} was NOT loaded: unpickling it needs more than tensors ({reason}), "
        "so loading it would run code stored in the file",
        "convert it to .safetensors, only if you trust its origin and in an isolated sandbox: "
        "`sd = torch.load(path, weights_only=False); sd = sd.get('state_dict', sd); "
        "safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items() "
        "if isinstance(v, torch.Tensor)}, 'model.safetensors')` — then pass the .safetensors file",
    )


def unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The flat ``{key: tensor}`` dict inside a loaded checkpoint (``state_dict`` nesting removed)."""
    for _ in range(4):
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        else:
            break
    if not isinstance(obj, Mapping):
        raise ModelFormatError(
            f"{source} holds a {type(obj).__name__}, not a dict of tensors",
            "pass a Stable Diffusion checkpoint (a state dict, possibly under 'state_dict')",
        )
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


class _CheckpointReader:
    """Key shapes up front, tensors on demand — for ``.safetensors`` (header only) and pickle files."""

    def __init__(self, path: Path, source: str) -> None:
        self.path = path
        self.source = source
        suffix = path.suffix.lower()
        self._tensors: dict[str, torch.Tensor] | None = None
        if suffix in SAFETENSORS_SUFFIXES:
            self.shapes = self._safetensors_shapes()
        elif suffix in PICKLE_SUFFIXES:
            self._tensors = self._torch_load()
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        else:
            raise ModelFormatError(
                f"{source}: unknown model file type {path.suffix or '(no extension)'!r}",
                "pass a diffusers folder or a .safetensors checkpoint "
                "(.ckpt/.bin/.pt are read as weights only)",
            )

    def _safetensors_shapes(self) -> dict[str, tuple[int, ...]]:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as handle:
                return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
        except Exception as error:  # safetensors raises its own SafetensorError (and OSError, ValueError)
            raise ModelFormatError(
                f"{self.source} is not a readable .safetensors file ({first_line(error)})",
                "the file may be truncated (an incomplete download) or not a safetensors file; "
                "download it again",
            ) from None

    def _torch_load(self) -> dict[str, torch.Tensor]:
        try:
            obj = torch.load(str(self.path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise unsafe_checkpoint(self.source, error) from None
        except (RuntimeError, OSError, EOFError, ValueError, AttributeError, ImportError) as error:
            raise ModelFormatError(
                f"cannot read {self.source} as a PyTorch checkpoint ({first_line(error)})",
                "the file may be truncated or not a checkpoint; prefer a .safetensors file",
            ) from None
        return unwrap_state_dict(obj, self.source)

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors for ``keys`` (safetensors reads only those)."""
        keys = list(keys)
        if self._tensors is not None:
            return {k: self._tensors[k] for k in keys}
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt", device="cpu") as handle:
            return {k: handle.get_tensor(k) for k in keys}

    def release(self) -> None:
        self._tensors = None


def _read_configs(
    config_dir: Path, components: tuple[str, ...], shipped: Path
) -> tuple[dict[str, dict], Path]:
    """The model and scheduler configs of a config folder, and the scheduler config's path (the one in
    the ``shipped`` config folder when ``config_dir`` has none)."""
    configs = {}
    for component in components:
        path = config_dir / component / "config.json"
        if not path.is_file():
            raise ModelFormatError(
                f"config_dir {config_dir} has no {component}/config.json",
                f"a config folder needs {', '.join(c + '/config.json' for c in components)} "
                "(diffusers layout, no weights); scheduler/ and tokenizer/ are optional",
            )
        configs[component] = _read_json(path, f"{component} config")
    scheduler = config_dir / "scheduler" / "scheduler_config.json"
    if not scheduler.is_file():
        scheduler = shipped / "scheduler" / "scheduler_config.json"
    configs["scheduler"] = _read_json(scheduler, "scheduler config")
    return configs, scheduler


def _shape_report(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = [k for k in expected if k in given and tuple(expected[k].shape) != tuple(given[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        key = mismatched[0]
        parts.append(
            f"{len(mismatched)} with other shapes (e.g. {key}: file {tuple(given[key].shape)}, "
            f"config {tuple(expected[key].shape)})"
        )
    return "; ".join(parts)


def _load_into(
    component: str,
    build: Callable[[], torch.nn.Module],
    state_dict: dict[str, torch.Tensor],
    *,
    on_meta: bool,
    source: str,
    config_path: Path,
) -> torch.nn.Module:
    """Build a model and load ``state_dict`` strictly; a key/shape mismatch becomes a teaching error.

    ``on_meta`` builds it without allocating or initialising weights and adopts the given tensors
    (``assign=True``): no random init, no second copy. The one non-persistent buffer of the models loaded
    here, CLIP's ``embeddings.position_ids`` (``arange(max_positions)``), is recreated; any other buffer
    left on the meta device is an error.
    """
    if on_meta:
        with torch.device("meta"):
            model = build()
    else:
        model = build()
    expected = model.state_dict()
    report = _shape_report(expected, state_dict)
    if report:
        raise ModelFormatError(
            f"the {component} weights in {source} do not fit {config_path}: {report}",
            "if this model has other widths than the standard one of its family, pass config_dir= a "
            "diffusers-layout folder whose unet/vae/text_encoder configs match the checkpoint",
        )
    state_dict = {k: (v if v.is_contiguous() else v.contiguous()) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=on_meta)
    if on_meta:
        _materialise_position_ids(model)
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:  # pragma: no cover - would mean a model grew another non-persistent buffer
            raise RuntimeError(f"{component}: tensors left uninitialised after loading: {leftover[:3]}")
    return model


def _materialise_position_ids(model: torch.nn.Module) -> None:
    for module in model.modules():
        buffer = module._buffers.get("position_ids")
        if buffer is not None and buffer.is_meta:
            module._buffers["position_ids"] = torch.arange(buffer.shape[-1]).expand(buffer.shape).clone()


def _convert(component: str, convert: Callable[[], dict], source: str, config_path: Path) -> dict:
    """Run one of diffusers' LDM → diffusers key conversions; a file it cannot map is a format error."""
    try:
        converted = convert()
    except (KeyError, IndexError, AttributeError, ValueError) as error:
        raise ModelFormatError(
            f"the {component} keys in {source} cannot be mapped onto {config_path} "
            f"({type(error).__name__}: {first_line(error)})",
            "the checkpoint is incomplete or of another architecture; if it is a model with other widths "
            "than the standard one of its family, pass config_dir= a diffusers-layout folder whose configs "
            "match it",
        ) from None
    return {k: v for k, v in converted.items() if v is not None}


def _fit_text_keys(converted: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict:
    """Converted text-encoder keys → the key names of this transformers' model.

    transformers ≥ 5.6 flattened ``CLIPTextModel`` (no ``text_model.`` level) while
    ``CLIPTextModelWithProjection`` keeps it beside ``text_projection``; older files may lack it either way.
    ``embeddings.position_ids`` (a constant ``arange`` in old checkpoints) is dropped: it is a
    non-persistent buffer the model creates itself.
    """
    expected = set(model.state_dict())
    fitted = {}
    for key, value in converted.items():
        key = key.removeprefix("text_model.")
        if key == "embeddings.position_ids":
            continue
        fitted[key if key in expected else f"text_model.{key}"] = value
    return fitted


def _text_encoder_state_dict(
    tensors: Mapping[str, torch.Tensor], model: torch.nn.Module, *, prefix: str, open_clip: bool
) -> dict:
    """The text encoder under ``prefix`` of an original checkpoint, keyed for ``model``, converted with
    diffusers' own ``convert_ldm_clip_checkpoint`` (Hugging Face CLIP layout: SD 1.x, SDXL's first encoder)
    or ``convert_open_clip_checkpoint`` (open_clip layout — fused ``in_proj`` split into q/k/v,
    ``text_projection`` transposed: SD 2.x, SDXL's second encoder)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    selected = {k: v for k, v in tensors.items() if k.startswith(prefix)}
    if open_clip:
        converted = convert_open_clip_checkpoint(model, selected, prefix=prefix)
    else:
        converted = convert_ldm_clip_checkpoint(selected, remove_prefix=prefix)
    return _fit_text_keys(converted, model)


def _shipped_single_file_configs(architecture: str, prediction_type: str | None, *, warn: bool) -> Path:
    """The shipped configs for a single file (SD 2.x: 768-v unless ``prediction_type`` says ε)."""
    if architecture == "sd2":
        if prediction_type is None and warn:
            logger.warning(
                "an SD 2.x single file does not say whether it predicts v (768 px, v2-1_768) or ε (512 px, "
                "v2-1_512): assuming v-prediction at 768 px; pass prediction_type='epsilon' for the 512 model"
            )
        return shipped_config_dir("sd2-base" if prediction_type == "epsilon" else "sd2")
    return shipped_config_dir(architecture)


def _load_single_file(
    file: Path,
    source: str,
    device: torch.device,
    dtype: torch.dtype,
    config_dir: Path | None,
    prediction_type: str | None = None,
) -> StableDiffusionComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    reader = _CheckpointReader(file, source)
    unet_in_channels = 4
    if config_dir is not None and (config_dir / "unet" / "config.json").is_file():
        unet_in_channels = int(
            _read_json(config_dir / "unet" / "config.json", "UNet config").get("in_channels", 4)
        )
    layout = detect_single_file(reader.shapes, source, unet_in_channels=unet_in_channels)
    architecture = layout.architecture
    family = ARCHITECTURE_NAMES[architecture]
    if layout.missing:
        found = ", ".join(component_description(c, architecture) for c in layout.present)
        lacking = " and ".join(component_description(c, architecture) for c in layout.missing)
        raise ModelFormatError(
            f"{source} is a {family} checkpoint with only {found}: it has no {lacking}",
            "generation needs the UNet, VAE and text encoder(s): use a full checkpoint (e.g. "
            "v1-5-pruned-emaonly.safetensors, sd_xl_base_1.0.safetensors) or a diffusers folder with all "
            "components",
        )
    shipped = _shipped_single_file_configs(architecture, prediction_type, warn=config_dir is None)
    configs_root = config_dir if config_dir is not None else shipped
    configs, scheduler_path = _read_configs(configs_root, tuple(layout.prefixes), shipped)
    if layout.ignored_keys:
        logger.info(
            "%s: ignoring %d keys outside the model's components (EMA copy, scheduler buffers, ...), e.g. %s",
            source,
            len(layout.ignored_keys),
            layout.ignored_keys[0],
        )

    prefixes = tuple(layout.prefixes.values())
    tensors = reader.read(k for k in reader.shapes if k.startswith(prefixes))
    reader.release()
    _check_finite(tensors.items(), str(file))

    def describe(component):
        return component_description(component, architecture)

    built = {}
    for name, convert, model_class in (
        ("unet", convert_ldm_unet_checkpoint, UNet2DConditionModel),
        ("vae", convert_ldm_vae_checkpoint, AutoencoderKL),
    ):
        config_path = configs_root / name / "config.json"
        state = _convert(describe(name), partial(convert, tensors, configs[name]), source, config_path)
        for key in [k for k in tensors if k.startswith(layout.prefixes[name])]:
            del tensors[key]  # the converted dict holds them now
        model = _load_into(
            describe(name),
            partial(model_class.from_config, configs[name]),
            state,
            on_meta=True,
            source=source,
            config_path=config_path,
        )
        del state
        built[name] = _finalize(
            model, device, vae_dtype(model, dtype, architecture) if name == "vae" else dtype
        )

    for name in ("text_encoder", "text_encoder_2"):
        if name not in configs:
            continue
        config = configs[name]
        text_config = CLIPTextConfig.from_dict(
            {k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}
        )
        with_projection = name == "text_encoder_2"
        text_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        with torch.device("meta"):  # the conversion needs only the config; the weights are adopted
            text_encoder = text_class(text_config)
        config_path = configs_root / name / "config.json"
        state = _convert(
            describe(name),
            partial(
                _text_encoder_state_dict,
                tensors,
                text_encoder,
                prefix=layout.prefixes[name],
                open_clip=architecture == "sd2" or with_projection,
            ),
            source,
            config_path,
        )
        text_encoder = _load_into(
            describe(name),
            partial(text_class, text_config),
            state,
            on_meta=True,
            source=source,
            config_path=config_path,
        )
        del state
        built[name] = _finalize(text_encoder, device, dtype)
    del tensors

    scheduler = scheduler_from_config(
        _with_prediction_type(configs["scheduler"], prediction_type), str(scheduler_path)
    )
    tokenizers = {}
    for name, pad in (("tokenizer", "!" if architecture == "sd2" else CLIP_EOS), ("tokenizer_2", "!")):
        encoder = built.get(name.replace("tokenizer", "text_encoder"))
        if encoder is None:
            continue
        tokenizer_dir = configs_root / name
        if config_dir is not None and tokenizer_dir.is_dir():
            tokenizer = _load_folder_tokenizer(tokenizer_dir)
        else:
            tokenizer = load_clip_tokenizer(pad_token=pad)
        tokenizers[name] = _fit_context(tokenizer, encoder)

    return StableDiffusionComponents(
        unet=built["unet"],
        vae=built["vae"],
        text_encoder=built["text_encoder"],
        tokenizer=tokenizers["tokenizer"],
        scheduler=scheduler,
        architecture=architecture,
        source=source,
        model_hash=file_sha256([file])[:10],
        extra={
            "format": "single-file",
            "weight_files": [str(file)],
            "config_dir": str(configs_root),
            "ignored_keys": len(layout.ignored_keys),
        },
        text_encoder_2=built.get("text_encoder_2"),
        tokenizer_2=tokenizers.get("tokenizer_2"),
        force_zeros_for_empty_prompt=architecture == "sdxl"
        and bool(_model_index_flag(configs_root, "force_zeros_for_empty_prompt", True)),
    )


def _with_prediction_type(config: dict, prediction_type: str | None) -> dict:
    return config if prediction_type is None else {**config, "prediction_type": prediction_type}


def _model_index_flag(config_root: Path, key: str, default):
    path = config_root / "model_index.json"
    return _read_json(path, "model_index").get(key, default) if path.is_file() else default

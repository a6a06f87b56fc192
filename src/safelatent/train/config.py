"""Settings of a LoRA training run: the dataclass, the TOML file, flag merging and validation.

A TOML file holds the same names as the dataclass fields (the CLI flags are the same names in
kebab-case: ``learning_rate`` ⇔ ``--learning-rate``). Precedence: defaults < the file < flags. Relative
paths in a file are relative to the file's folder. Unknown keys and values of the wrong type are errors
that name the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError
from .losses import PREDICTION_TYPES

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("auto", "adamw", "adamw8bit")
CROPS = ("center", "random")
LORA_INITS = ("gaussian", "default")
DEVICES = ("auto", "cpu", "cuda")
#: Fields that are paths (resolved against a TOML file's folder).
PATH_FIELDS = ("data_dir", "out_dir", "model", "model_config", "vae")
#: Settings that may change between a run and its resume (they do not affect the weights).
RESUME_MUTABLE = (
    "resume",
    "validation_prompts",
    "validation_steps",
    "validation_images",
    "validation_cfg",
    "validation_inference_steps",
    "checkpoint_steps",
    "keep_checkpoints",
    "export_kohya",
    "name",
    "out_dir",
    "data_dir",
    "model",
    "model_config",
    "threads",
    "progress",
)


ESD_VARIANTS = ("x", "kv", "u")


@dataclass
class AdapterTrainConfig:
    """The settings every adapter run shares (model, LoRA, optimisation, bookkeeping); the theme trainer
    (:class:`LoraTrainConfig`) and the erasure trainer (:class:`EraseTrainConfig`) add their own."""

    out_dir: str = ""
    #: a diffusers folder or one checkpoint file; ``None`` = the toy model that ships in the package
    model: str | None = None
    #: diffusers-layout config folder for a single-file checkpoint whose widths differ from its family's
    model_config: str | None = None
    #: what the model predicts (``epsilon`` / ``v_prediction``), overriding its scheduler config — the
    #: training target, and the sampler of validation images and erasure trajectories; ``None`` = the
    #: model's own (an SD 2.x 512 single file needs ``epsilon``: a single file does not record it)
    prediction_type: str | None = None
    #: a diffusers VAE folder replacing the model's (e.g. the fp16-safe SDXL VAE)
    vae: str | None = None
    name: str | None = None
    #: training side length in pixels; ``None`` = the model's default size
    resolution: int | None = None
    # LoRA
    rank: int = 4
    #: LoRA α; the update is scaled by α / rank. ``None`` = rank (scale 1)
    alpha: float | None = None
    lora_init: str = "gaussian"
    lora_dropout: float = 0.0
    # optimisation
    steps: int = 1000
    batch_size: int = 1
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "auto"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    # precision and memory
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    # bookkeeping
    seed: int = 0
    checkpoint_steps: int = 500
    keep_checkpoints: int = 3
    resume: bool = False
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 0
    validation_images: int = 2
    validation_cfg: float = 7.5
    validation_inference_steps: int = 30
    device: str = "auto"
    threads: int | None = None
    progress: bool = True

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def output_name(self) -> str:
        return self.name or Path(self.out_dir).name or "lora"


@dataclass
class LoraTrainConfig(AdapterTrainConfig):
    """Every setting of a theme LoRA run (recorded in the output file's ``safelatent`` header)."""

    data_dir: str = ""
    # data
    trigger: str | None = None
    caption_ext: str = ".txt"
    bucketing: bool = True
    #: bucket sides are multiples of this; ``None`` = the UNet's latent granularity (64 px for SD)
    bucket_step: int | None = None
    max_aspect: float = 2.0
    crop: str = "center"
    flip_prob: float = 0.0
    caption_dropout: float = 0.0
    cache_latents: bool = False
    cache_text: bool = False
    # LoRA targets
    unet_targets: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    train_text_encoder: bool = False
    text_encoder_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    text_encoder_lr: float | None = None
    #: when set, ``steps`` = epochs × optimizer steps per epoch
    epochs: int | None = None
    # objective
    #: Min-SNR-γ weighting; ``None`` or 0 = plain MSE
    min_snr_gamma: float | None = 5.0
    noise_offset: float = 0.0
    export_kohya: bool = False


@dataclass
class EraseTrainConfig(AdapterTrainConfig):
    """Every setting of an erasure run (ESD objective as a LoRA; :mod:`safelatent.train.erase`)."""

    #: the concept to erase, as a prompt (e.g. ``"blood splatter"``)
    concept: str = ""
    #: ``x``: LoRA on the cross-attention layers (ESD-x); ``u``: on everything else (ESD-u)
    variant: str = "x"
    #: η, the negative guidance of the target ε_∅ − η·(ε_c − ε_∅)
    eta: float = 1.0
    #: concepts whose predictions are held to the frozen model's
    preserve: list[str] = field(default_factory=list)
    #: weight of the preservation term relative to the erasure term
    preserve_weight: float = 1.0
    #: partial-sampling trajectories of the frozen model per prompt (the training pool)
    trajectories: int = 64
    #: DDIM steps of those trajectories (every step's x_t is a training example)
    sample_steps: int = 50
    #: classifier-free guidance scale of the trajectories (the ESD paper's sampler uses 3.0)
    sample_cfg: float = 3.0
    #: a prompt set (``coco``, a toy set, a CSV file) whose text-encoder states the cross-attention
    #: key/value LoRA must leave alone (UCE's preservation term); ``None``: no anchor term
    anchors: str | None = None
    #: prompts drawn from ``anchors`` (those that name the concept are left out)
    anchor_count: int = 300
    #: λ of the anchor term
    anchor_weight: float = 1.0


TrainConfig = LoraTrainConfig | EraseTrainConfig


#: the ``safelatent train`` command and TOML table of each config class
COMMANDS: dict[type, str] = {LoraTrainConfig: "lora", EraseTrainConfig: "erase"}


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _allowed_types(cls: type, name: str) -> tuple[type, ...]:
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(typing.get_origin(a) or a for a in args)


def _closest(cls: type, name: str) -> str:
    match = difflib.get_close_matches(name, _fields(cls), n=1)
    command = COMMANDS[cls]
    return (
        f"did you mean {match[0]!r}?"
        if match
        else f"see `safelatent train {command} --help` for the settings"
    )


def coerce(name: str, value: Any, where: str, cls: type = LoraTrainConfig) -> Any:
    """Check ``value``'s type for field ``name`` of ``cls`` (ints are accepted for floats); raise with a
    hint."""
    if name not in _fields(cls):
        raise InvalidArgumentError(f"unknown setting {name!r} in {where}", _closest(cls, name))
    allowed = _allowed_types(cls, name)
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if list in allowed:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise InvalidArgumentError(f"{name} in {where} must be a list of strings, got {value!r}")
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        names = " or ".join(t.__name__ for t in allowed if t is not type(None))
        raise InvalidArgumentError(f"{name} in {where} must be {names}, got {value!r}")
    return value


def read_toml(path: str | Path, cls: type = LoraTrainConfig) -> dict[str, Any]:
    """The settings of ``cls`` in a TOML file (flat ``key = value``, or all under a ``[lora]`` /
    ``[erase]`` table), type-checked; relative paths resolved against the file's folder."""
    table = COMMANDS[cls]
    path = Path(path).expanduser().absolute()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidArgumentError(f"config file {path} does not exist", "check the --config path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise InvalidArgumentError(f"{path} is not valid TOML: {error}", "fix the line it names") from None
    if set(raw) == {table} and isinstance(raw[table], dict):
        raw = raw[table]
    values = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            raise InvalidArgumentError(
                f"unexpected table [{key}] in {path}", f"put the settings at the top level or under [{table}]"
            )
        values[key] = coerce(key, value, str(path), cls)
        if key in PATH_FIELDS and values[key] is not None:
            p = Path(values[key]).expanduser()
            values[key] = str(p if p.is_absolute() else (path.parent / p))
    return values


def build_config(
    file_values: dict[str, Any] | None = None,
    flags: dict[str, Any] | None = None,
    cls: type = LoraTrainConfig,
):
    """Defaults < ``file_values`` < ``flags`` (flags that are ``None`` were not given); validated."""
    values: dict[str, Any] = dict(file_values or {})
    for key, value in (flags or {}).items():
        if value is not None:
            values[key] = coerce(key, value, "the command line", cls)
    config = cls(**values)
    validate(config)
    return config


def _check(condition: bool, what: str, hint: str | None = None) -> None:
    if not condition:
        raise InvalidArgumentError(what, hint)


def _check_choice(name: str, value: str | None, choices: tuple[str, ...], optional: bool = False) -> None:
    if value is None and optional:
        return
    _check(
        value in choices, f"{name} {value!r} is not one of: {', '.join(choices)}", f"use e.g. {choices[0]!r}"
    )


def validate(config: TrainConfig) -> None:
    """Raise :class:`InvalidArgumentError` (what is wrong — what to do) for an unusable setting."""
    if isinstance(config, EraseTrainConfig):
        _validate_common(config)
        _validate_erase(config)
    else:
        _check(
            bool(config.data_dir), "no training data folder given", "pass DATA_DIR (or data_dir in --config)"
        )
        _validate_common(config)
        _validate_theme(config)


def _validate_common(config: AdapterTrainConfig) -> None:
    _check(bool(config.out_dir), "no output folder given", "pass --out DIR (or out_dir in --config)")
    _check_choice("prediction_type", config.prediction_type, PREDICTION_TYPES, optional=True)
    _check(config.rank >= 1, f"rank must be ≥ 1, got {config.rank}", "typical values are 4–64")
    _check(
        config.alpha is None or (math.isfinite(config.alpha) and config.alpha > 0),
        f"alpha must be a positive number, got {config.alpha}",
        "leave it out to use alpha = rank",
    )
    _check(config.steps >= 1, f"steps must be ≥ 1, got {config.steps}")
    _check(config.batch_size >= 1, f"batch_size must be ≥ 1, got {config.batch_size}")
    _check(config.gradient_accumulation >= 1, "gradient_accumulation must be ≥ 1")
    _check(config.learning_rate > 0, f"learning_rate must be > 0, got {config.learning_rate}")
    _check(config.lr_warmup_steps >= 0, "lr_warmup_steps must be ≥ 0")
    _check(config.max_grad_norm >= 0, "max_grad_norm must be ≥ 0 (0 turns clipping off)")
    _check(0.0 <= config.lora_dropout < 1.0, "lora_dropout must be in [0, 1)")
    _check(config.resolution is None or config.resolution >= 8, "resolution must be ≥ 8 pixels")
    _check(config.checkpoint_steps >= 0, "checkpoint_steps must be ≥ 0 (0: no checkpoints)")
    _check(config.keep_checkpoints >= 1, "keep_checkpoints must be ≥ 1")
    _check(config.validation_steps >= 0, "validation_steps must be ≥ 0 (0: validate at the end only)")
    _check(config.validation_images >= 1, "validation_images must be ≥ 1")
    _check(config.threads is None or config.threads >= 1, "threads must be ≥ 1")
    _check_choice("lr_scheduler", config.lr_scheduler, LR_SCHEDULERS)
    _check_choice("mixed_precision", config.mixed_precision, MIXED_PRECISION)
    _check_choice("optimizer", config.optimizer, OPTIMIZERS)
    _check_choice("lora_init", config.lora_init, LORA_INITS)
    _check_choice("device", config.device, DEVICES)


def _validate_erase(config: EraseTrainConfig) -> None:
    _check(bool(config.concept.strip()), "no concept to erase given", 'pass --concept "TEXT"')
    _check_choice("variant", config.variant, ESD_VARIANTS)
    _check(math.isfinite(config.eta) and config.eta > 0, f"eta must be > 0, got {config.eta}", "ESD uses 1.0")
    _check(config.preserve_weight >= 0, f"preserve_weight must be ≥ 0, got {config.preserve_weight}")
    _check(all(p.strip() for p in config.preserve), "an empty concept in preserve", "drop the empty entry")
    _check(
        config.concept.strip() not in {p.strip() for p in config.preserve},
        f"{config.concept!r} is both erased and preserved",
        "remove it from --preserve",
    )
    _check(config.trajectories >= 1, f"trajectories must be ≥ 1, got {config.trajectories}")
    _check(config.sample_steps >= 2, f"sample_steps must be ≥ 2, got {config.sample_steps}")
    _check(config.sample_cfg >= 1.0, f"sample_cfg must be ≥ 1, got {config.sample_cfg}")
    _check(config.anchor_count >= 1, f"anchor_count must be ≥ 1, got {config.anchor_count}")
    _check(
        math.isfinite(config.anchor_weight) and config.anchor_weight >= 0,
        f"anchor_weight must be ≥ 0, got {config.anchor_weight}",
    )
    _check(
        not (config.anchors and config.variant == "u"),
        "anchors hold the cross-attention keys/values, which ESD-u does not adapt",
        "use --variant x or kv with --anchors, or drop --anchors",
    )


def _validate_theme(config: LoraTrainConfig) -> None:
    _check(config.epochs is None or config.epochs >= 1, f"epochs must be ≥ 1, got {config.epochs}")
    _check(config.text_encoder_lr is None or config.text_encoder_lr > 0, "text_encoder_lr must be > 0")
    _check(0.0 <= config.flip_prob <= 1.0, f"flip_prob must be in [0, 1], got {config.flip_prob}")
    _check(0.0 <= config.caption_dropout <= 1.0, "caption_dropout must be in [0, 1]")
    _check(config.noise_offset >= 0, "noise_offset must be ≥ 0", "typical values are 0.05–0.1")
    _check(config.min_snr_gamma is None or config.min_snr_gamma >= 0, "min_snr_gamma must be ≥ 0")
    _check(config.max_aspect >= 1.0, "max_aspect must be ≥ 1", "2.0 allows 1:2 to 2:1 buckets")
    _check(config.bucket_step is None or config.bucket_step >= 8, "bucket_step must be ≥ 8 pixels")
    _check(bool(config.unet_targets), "unet_targets is empty", "e.g. ['to_k', 'to_q', 'to_v', 'to_out.0']")
    _check(
        not config.train_text_encoder or bool(config.text_encoder_targets),
        "text_encoder_targets is empty",
        "e.g. ['q_proj', 'k_proj', 'v_proj', 'out_proj']",
    )
    _check_choice("crop", config.crop, CROPS)
    _check(config.caption_ext.startswith("."), f"caption_ext must start with '.', got {config.caption_ext!r}")
    _check(
        not (config.cache_text and config.train_text_encoder),
        "cache_text cannot be used with train_text_encoder (the embeddings change as the encoder trains)",
        "turn one of them off",
    )
    _check(
        not (config.cache_latents and config.crop == "random"),
        "cache_latents cannot be used with crop = 'random' (each step would need a new crop)",
        "use crop = 'center' or turn cache_latents off",
    )
    if config.trigger is not None:
        _check(
            bool(config.trigger.strip()), "the trigger word is empty", "leave --trigger out or give a word"
        )


def resume_differences(saved: dict[str, Any], current: AdapterTrainConfig) -> list[str]:
    """Settings that differ between a checkpoint's run and this one and would change the result."""
    now = current.as_dict()
    return sorted(
        f"{k}: {saved.get(k)!r} → {now[k]!r}"
        for k in now
        if k not in RESUME_MUTABLE and k in saved and saved[k] != now[k]
    )

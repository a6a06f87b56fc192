"""``safelatent train …``: a thin shell over :func:`safelatent.train.lora.train_lora`.

Every flag is a field of :class:`~safelatent.train.config.LoraTrainConfig` in kebab-case; ``--config
train.toml`` holds the same names in snake_case, and flags override the file. User errors print one
line and exit with status 2 (``SAFELATENT_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .cli_errors import err, user_errors

train_app = typer.Typer(
    help="Train adapters: LoRA theme adapters from images, erasure adapters (ESD) from a concept.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@train_app.callback()
def _group() -> None:
    """Train adapters: LoRA theme adapters from images, erasure adapters (ESD) from a concept."""


_DATA = "Data"
_LORA = "LoRA"
_OPT = "Optimisation"
_OBJ = "Objective"
_RUN = "Run"


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _opt(help: str, panel: str = _RUN, *names: str):
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False)


# options both commands take
_OutOption = Annotated[Path | None, _opt("Output folder (weights, checkpoints, logs).", _RUN, "--out", "-o")]
_ModelOption = Annotated[
    Path | None,
    _opt("Base model: diffusers folder or checkpoint file (default: the toy model).", _RUN, "--model", "-m"),
]
_ModelConfigOption = Annotated[Path | None, _opt("Config folder for a single-file model of other widths.")]
_PredictionTypeOption = Annotated[
    str | None,
    _opt("epsilon or v_prediction: what the model predicts (default: its scheduler's; an SD 2.x 512 single"
         " file needs epsilon).", _OBJ),
]  # fmt: skip
_VaeOption = Annotated[
    Path | None, _opt("A diffusers VAE folder replacing the model's (fp16-safe SDXL VAE).")
]
_RankOption = Annotated[int | None, _opt("LoRA rank r (default 4).", _LORA)]
_StepsOption = Annotated[int | None, _opt("Optimizer steps (default 1000).", _OPT)]
_LearningRateOption = Annotated[
    float | None, _opt("Learning rate (default 1e-4).", _OPT, "--learning-rate", "--lr")
]
_LrSchedulerOption = Annotated[str | None, _opt("constant, constant_with_warmup, linear, cosine, …", _OPT)]
_LrWarmupStepsOption = Annotated[int | None, _opt("Warm-up steps (default 0).", _OPT)]
_MixedPrecisionOption = Annotated[str | None, _opt("no, bf16 or fp16 (CUDA); LoRA weights stay fp32.", _OPT)]
_CheckpointStepsOption = Annotated[int | None, _opt("Checkpoint every N steps; 0 = never (default 500).")]
_KeepCheckpointsOption = Annotated[int | None, _opt("Newest checkpoints to keep (default 3).")]
_ResumeOption = Annotated[
    bool | None, _opt("Continue from the latest checkpoint in --out.", _RUN, "--resume/--no-resume")
]
_ValidationPromptOption = Annotated[
    list[str] | None, _opt("A validation prompt (repeatable).", _RUN, "--validation-prompt")
]
_ValidationStepsOption = Annotated[int | None, _opt("Validation images every N steps (0: at the end only).")]
_DeviceOption = Annotated[str | None, _opt("auto, cpu or cuda.")]
_ThreadsOption = Annotated[int | None, _opt("CPU threads.")]
_ProgressOption = Annotated[bool | None, _opt("Progress bar.", _RUN, "--progress/--no-progress")]


@train_app.command("lora")
@user_errors
def lora(
    data_dir: Annotated[
        Path | None,
        typer.Argument(help="Folder of images with same-name .txt captions, or with a metadata.jsonl."),
    ] = None,
    out: _OutOption = None,
    model: _ModelOption = None,
    config: Annotated[
        Path | None, _opt("TOML file of settings (flags override it).", _RUN, "--config", "-c")
    ] = None,
    model_config: _ModelConfigOption = None,
    vae: _VaeOption = None,
    name: Annotated[str | None, _opt("Name of the kohya export (default: the --out folder's name).")] = None,
    # data
    trigger: Annotated[str | None, _opt("Trigger word prepended to every caption.", _DATA)] = None,
    caption_ext: Annotated[str | None, _opt("Caption file extension (default .txt).", _DATA)] = None,
    resolution: Annotated[int | None, _opt("Training size in pixels (default: the model's).", _DATA)] = None,
    bucketing: Annotated[
        bool | None, _opt("Aspect-ratio buckets (default on).", _DATA, "--bucketing/--no-bucketing")
    ] = None,
    bucket_step: Annotated[
        int | None, _opt("Bucket sides are multiples of this (default: 64 for SD).", _DATA)
    ] = None,
    max_aspect: Annotated[float | None, _opt("Largest bucket aspect ratio (default 2).", _DATA)] = None,
    crop: Annotated[str | None, _opt("center or random (default center).", _DATA)] = None,
    flip_prob: Annotated[float | None, _opt("Probability of a left-right flip (default 0).", _DATA)] = None,
    caption_dropout: Annotated[
        float | None, _opt("Probability of an empty caption (default 0).", _DATA)
    ] = None,
    cache_latents: Annotated[
        bool | None, _opt("Encode images once.", _DATA, "--cache-latents/--no-cache-latents")
    ] = None,
    cache_text: Annotated[
        bool | None, _opt("Encode captions once.", _DATA, "--cache-text/--no-cache-text")
    ] = None,
    # LoRA
    rank: _RankOption = None,
    alpha: Annotated[
        float | None, _opt("LoRA alpha; the update is scaled by alpha/rank (default: rank).", _LORA)
    ] = None,
    lora_init: Annotated[str | None, _opt("gaussian (diffusers' recipe) or default (peft's).", _LORA)] = None,
    lora_dropout: Annotated[float | None, _opt("Dropout on the LoRA input (default 0).", _LORA)] = None,
    unet_targets: Annotated[
        str | None, _opt("Comma-separated UNet modules (default to_k,to_q,to_v,to_out.0).", _LORA)
    ] = None,
    train_text_encoder: Annotated[
        bool | None,
        _opt("Also train a text-encoder LoRA.", _LORA, "--train-text-encoder/--no-train-text-encoder"),
    ] = None,
    text_encoder_targets: Annotated[str | None, _opt("Comma-separated text-encoder modules.", _LORA)] = None,
    # optimisation
    steps: _StepsOption = None,
    epochs: Annotated[int | None, _opt("Train this many epochs instead of --steps.", _OPT)] = None,
    batch_size: Annotated[int | None, _opt("Images per batch and process (default 1).", _OPT)] = None,
    gradient_accumulation: Annotated[
        int | None, _opt("Batches per optimizer step (default 1).", _OPT)
    ] = None,
    learning_rate: _LearningRateOption = None,
    text_encoder_lr: Annotated[
        float | None, _opt("Text-encoder learning rate (default: --lr).", _OPT)
    ] = None,
    lr_scheduler: _LrSchedulerOption = None,
    lr_warmup_steps: _LrWarmupStepsOption = None,
    optimizer: Annotated[
        str | None, _opt("auto (8-bit AdamW with bitsandbytes on CUDA), adamw, adamw8bit.", _OPT)
    ] = None,
    adam_beta1: Annotated[float | None, _opt("AdamW β1 (default 0.9).", _OPT)] = None,
    adam_beta2: Annotated[float | None, _opt("AdamW β2 (default 0.999).", _OPT)] = None,
    adam_epsilon: Annotated[float | None, _opt("AdamW ε (default 1e-8).", _OPT)] = None,
    weight_decay: Annotated[float | None, _opt("AdamW weight decay (default 0.01).", _OPT)] = None,
    max_grad_norm: Annotated[float | None, _opt("Gradient clipping norm; 0 = off (default 1).", _OPT)] = None,
    mixed_precision: _MixedPrecisionOption = None,
    gradient_checkpointing: Annotated[
        bool | None,
        _opt("Trade compute for memory.", _OPT, "--gradient-checkpointing/--no-gradient-checkpointing"),
    ] = None,
    # objective
    prediction_type: _PredictionTypeOption = None,
    min_snr_gamma: Annotated[float | None, _opt("Min-SNR-γ weighting; 0 = off (default 5).", _OBJ)] = None,
    noise_offset: Annotated[float | None, _opt("Noise offset (default 0; 0.05–0.1 typical).", _OBJ)] = None,
    # run
    seed: Annotated[int | None, _opt("Seed of initialisation, data order and noise (default 0).")] = None,
    checkpoint_steps: _CheckpointStepsOption = None,
    keep_checkpoints: _KeepCheckpointsOption = None,
    resume: _ResumeOption = None,
    validation_prompt: _ValidationPromptOption = None,
    validation_steps: _ValidationStepsOption = None,
    validation_images: Annotated[int | None, _opt("Images per validation prompt (default 2).")] = None,
    validation_cfg: Annotated[float | None, _opt("CFG scale of validation images (default 7.5).")] = None,
    validation_inference_steps: Annotated[
        int | None, _opt("Sampling steps of validation images (default 30).")
    ] = None,
    export_kohya: Annotated[
        bool | None, _opt("Also write <name>_kohya.safetensors.", _RUN, "--export-kohya/--no-export-kohya")
    ] = None,
    device: _DeviceOption = None,
    threads: _ThreadsOption = None,
    progress: _ProgressOption = None,
) -> None:
    """Train a LoRA theme adapter: writes OUT/pytorch_lora_weights.safetensors (diffusers format)."""
    flags = dict(locals())
    from .train.config import LoraTrainConfig
    from .train.lora import train_lora

    for key in ("config", "validation_prompt", "out"):
        flags.pop(key)
    flags.update(
        out_dir=None if out is None else str(out),
        data_dir=None if data_dir is None else str(data_dir),
        model=None if model is None else str(model),
        model_config=None if model_config is None else str(model_config),
        vae=None if vae is None else str(vae),
        unet_targets=_split(unet_targets),
        text_encoder_targets=_split(text_encoder_targets),
        validation_prompts=validation_prompt or None,
    )
    _train(LoraTrainConfig, train_lora, config, flags)


def _train(cls, trainer, config_file: Path | None, flags: dict) -> None:
    """Settings (defaults < ``--config`` file < flags) → ``trainer`` → one JSON summary on stdout."""
    from .train.config import build_config, read_toml

    file_values = read_toml(config_file, cls) if config_file is not None else {}
    settings = build_config(file_values, flags, cls)
    summary = trainer(settings, log=lambda message: err.print(message, highlight=False))
    summary.pop("losses", None)
    if summary["process_index"] == 0:  # under `accelerate launch`, one summary for the run
        typer.echo(json.dumps(summary, indent=2, default=str))


_ERASE = "Erasure"


@train_app.command("erase")
@user_errors
def erase(
    concept: Annotated[
        str | None, _opt('The concept to erase, as a prompt (e.g. "blood splatter").', _ERASE)
    ] = None,
    out: _OutOption = None,
    model: _ModelOption = None,
    config: Annotated[
        Path | None,
        _opt(
            "TOML file of settings (flags override it; [erase] table or top level).", _RUN, "--config", "-c"
        ),
    ] = None,
    model_config: _ModelConfigOption = None,
    vae: _VaeOption = None,
    prediction_type: _PredictionTypeOption = None,
    variant: Annotated[
        str | None,
        _opt("x: cross-attention (ESD-x, default); kv: its keys/values only; u: all else (ESD-u).", _ERASE),
    ] = None,
    eta: Annotated[float | None, _opt("η, negative guidance of the target (default 1).", _ERASE)] = None,
    preserve: Annotated[
        list[str] | None,
        _opt("A concept to keep as the base model has it (repeatable).", _ERASE, "--preserve"),
    ] = None,
    preserve_weight: Annotated[
        float | None, _opt("Weight of the preservation term (default 1).", _ERASE)
    ] = None,
    trajectories: Annotated[
        int | None, _opt("Frozen-model trajectories per prompt in the training pool (default 64).", _ERASE)
    ] = None,
    sample_steps: Annotated[int | None, _opt("DDIM steps of each trajectory (default 50).", _ERASE)] = None,
    sample_cfg: Annotated[float | None, _opt("CFG scale of the trajectories (default 3).", _ERASE)] = None,
    anchors: Annotated[
        str | None,
        _opt(
            "Prompt set (coco, toy-captions, a CSV) whose text states the key/value LoRA must not answer:"
            " keeps other concepts, and adapters stacked on top, as they were.",
            _ERASE,
        ),
    ] = None,
    anchor_count: Annotated[int | None, _opt("Anchor prompts drawn (default 300).", _ERASE)] = None,
    anchor_weight: Annotated[float | None, _opt("λ of the anchor term (default 1).", _ERASE)] = None,
    resolution: Annotated[int | None, _opt("Sampling size in pixels (default: the model's).", _ERASE)] = None,
    rank: _RankOption = None,
    alpha: Annotated[float | None, _opt("LoRA alpha (default: rank).", _LORA)] = None,
    steps: _StepsOption = None,
    batch_size: Annotated[int | None, _opt("Pool examples per batch and process (default 1).", _OPT)] = None,
    learning_rate: _LearningRateOption = None,
    lr_scheduler: _LrSchedulerOption = None,
    lr_warmup_steps: _LrWarmupStepsOption = None,
    mixed_precision: _MixedPrecisionOption = None,
    gradient_checkpointing: Annotated[
        bool | None,
        _opt("Trade compute for memory.", _OPT, "--gradient-checkpointing/--no-gradient-checkpointing"),
    ] = None,
    seed: Annotated[int | None, _opt("Seed of initialisation, trajectories and draws (default 0).")] = None,
    checkpoint_steps: _CheckpointStepsOption = None,
    keep_checkpoints: _KeepCheckpointsOption = None,
    resume: _ResumeOption = None,
    validation_prompt: _ValidationPromptOption = None,
    validation_steps: _ValidationStepsOption = None,
    device: _DeviceOption = None,
    threads: _ThreadsOption = None,
    progress: _ProgressOption = None,
) -> None:
    """Train an erasure adapter (ESD objective as a LoRA, no image data): writes
    OUT/pytorch_lora_weights.safetensors, loaded with --lora like any adapter."""
    flags = dict(locals())
    from .train.config import EraseTrainConfig
    from .train.erase import train_erase

    for key in ("config", "validation_prompt", "out"):
        flags.pop(key)
    flags.update(
        out_dir=None if out is None else str(out),
        model=None if model is None else str(model),
        model_config=None if model_config is None else str(model_config),
        vae=None if vae is None else str(vae),
        validation_prompts=validation_prompt or None,
        preserve=preserve or None,
    )
    _train(EraseTrainConfig, train_erase, config, flags)

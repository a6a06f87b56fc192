"""What every adapter-training run shares: the theme trainer (:mod:`.lora`) and the erasure trainer
(:mod:`.erase`) differ only in their data and their loss.

:class:`AdapterRun` loads the base model (frozen), attaches peft LoRA adapters (``add_adapter``; trained
parameters in float32 under bf16/fp16 mixed precision), builds the optimizer (AdamW, or bitsandbytes'
8-bit AdamW on CUDA) and diffusers' LR schedule, wraps everything in ``accelerate``'s ``Accelerator``
(devices, mixed precision, several processes), and owns validation images, checkpoints with exact resume
(:mod:`.checkpoint`), and the adapter files (:mod:`.export`). :func:`run_training` is the loop: gradient
accumulation, clipping, progress bar, logs, checkpoints. A subclass supplies ``setup_data``,
``next_batch``, ``micro_step`` and its metadata.

Exact resume: every random draw of a micro-batch comes from a generator seeded by (seed, micro-batch
number, process) (:func:`step_generator`); what else a run depends on is fingerprinted
(:meth:`AdapterRun.fingerprint`) and checked on ``--resume``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import InvalidArgumentError
from .checkpoint import (
    TrainPosition,
    latest_checkpoint,
    load_checkpoint,
    set_rng_state,
    staging_dir,
    write_checkpoint,
    write_process_rng,
)
from .config import AdapterTrainConfig, resume_differences, validate
from .export import (
    SAFELATENT_FORMAT_VERSION,
    adapter_metadata,
    canonical_text_encoder_keys,
    lora_state_dict,
    save_diffusers_lora,
    save_kohya_lora,
)
from .logs import TrainLog

__all__ = ["AdapterRun", "run_training"]

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------------------------------


def make_accelerator(config: AdapterTrainConfig):
    from accelerate import Accelerator

    if config.device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(
            "--device cuda was asked for but no CUDA GPU is visible", "use --device cpu"
        )
    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    if cpu and config.mixed_precision == "fp16":
        raise InvalidArgumentError(
            "fp16 mixed precision needs a CUDA GPU", "use --mixed-precision bf16 (or no) on the CPU"
        )
    return Accelerator(mixed_precision=config.mixed_precision, cpu=cpu)


def load_base(config: AdapterTrainConfig, device, dtype):
    from ..models.loading import load_components
    from ..toy.model import toy_model_dir

    model = config.model
    if model is None:
        model = toy_model_dir()
        if not (model / "model_index.json").exists():
            raise InvalidArgumentError(
                "no --model given and the toy model is not installed", "pass --model PATH"
            )
    return load_components(
        model,
        device=device,
        dtype=dtype,
        config_dir=config.model_config,
        prediction_type=config.prediction_type,
        vae=config.vae,
    )


def add_lora(model, targets: list[str] | str, config: AdapterTrainConfig, what: str) -> None:
    """Attach a peft LoRA adapter (``add_adapter``; diffusers' and transformers' PEFT integration);
    ``targets``: module-name suffixes, or one regular expression matched against whole names."""
    from peft import LoraConfig

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        init_lora_weights="gaussian" if config.lora_init == "gaussian" else True,
        target_modules=targets if isinstance(targets, str) else list(targets),
        lora_dropout=config.lora_dropout,
    )
    try:
        model.add_adapter(lora)
    except ValueError as error:
        names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise InvalidArgumentError(
            f"{what} LoRA targets {targets} match no layer: {str(error).splitlines()[0]}",
            f"linear layers of this {what} end in: {', '.join(names[:20])}",
        ) from None


def make_optimizer(config: AdapterTrainConfig, groups: list[dict], device: torch.device, say):
    kwargs = {
        "betas": (config.adam_beta1, config.adam_beta2),
        "eps": config.adam_epsilon,
        "weight_decay": config.weight_decay,
    }
    choice = config.optimizer
    try:
        import bitsandbytes as bnb
    except Exception:  # missing, or installed without a usable backend
        bnb = None
    if choice == "auto":
        choice = "adamw8bit" if bnb is not None and device.type == "cuda" else "adamw"
    if choice == "adamw8bit":
        if bnb is None:
            raise InvalidArgumentError(
                "--optimizer adamw8bit needs bitsandbytes", "pip install 'safelatent[train]' or use adamw"
            )
        say("optimizer: 8-bit AdamW (bitsandbytes)")
        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def seed_of(entropy: list[int]) -> int:
    """A 62-bit seed mixed from ``entropy`` (NumPy's ``SeedSequence``)."""
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 30 | int(state[1]) >> 2


def step_generator(seed: int, micro_step: int, process_index: int) -> torch.Generator:
    """The CPU generator of one micro-batch: a pure function of (seed, micro-batch number, process)."""
    return torch.Generator().manual_seed(seed_of([seed, micro_step, process_index]))


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


class AdapterRun:
    """One training run's state (kept in one object so the loop, validation and checkpoints share it).

    Subclasses implement :meth:`setup_data` (and may set ``total_steps``), :meth:`next_batch`,
    :meth:`micro_step`, :meth:`fingerprint`; they may extend :meth:`extra_metadata`,
    :meth:`kohya_metadata` and :meth:`summary_extra`."""

    #: progress-bar label
    label = "lora"
    #: what changed when :meth:`fingerprint` differs on resume, and what to do about it
    fingerprint_changed = (
        "the run's inputs changed since it was written",
        "start a new run in another --out folder",
    )

    def __init__(self, config: AdapterTrainConfig, log) -> None:
        self.config = config
        self.started = time.perf_counter()
        self.accelerator = make_accelerator(config)
        self.is_main = self.accelerator.is_main_process
        self.say = log if self.is_main else (lambda *a, **k: None)
        self.out_dir = Path(config.out_dir).expanduser()
        self.last_validation: Path | None = None
        self.total_steps = config.steps
        if config.threads and self.accelerator.device.type == "cpu":
            torch.set_num_threads(config.threads)

    # ---- hooks ----------------------------------------------------------------------------------

    @property
    def trains_text_encoder(self) -> bool:
        return bool(getattr(self.config, "train_text_encoder", False))

    def trained_text_encoders(self) -> list[tuple[str, torch.nn.Module]]:
        """``(component, model)`` of every text encoder with a trained LoRA: none, ``text_encoder``, or
        (SDXL) both ``text_encoder`` and ``text_encoder_2`` — as prepared by ``accelerate`` once it has."""
        if not self.trains_text_encoder:
            return []
        names = ["text_encoder"] + (["text_encoder_2"] if self.text_encoder_2 is not None else [])
        return [(name, getattr(self, name)) for name in names]

    def unet_targets(self) -> list[str] | str:
        """The UNet modules the LoRA adapts (suffixes, or one regular expression)."""
        raise NotImplementedError

    def setup_data(self) -> None:
        """Prepare the run's data once the model and its adapters exist (before the optimizer)."""

    def next_batch(self, position: TrainPosition) -> Any:
        """The next micro-batch's description (advancing ``position``'s epoch and batch index)."""
        raise NotImplementedError

    def micro_step(self, batch: Any, generator: torch.Generator, scale: float, sync: bool) -> torch.Tensor:
        """Forward + backward of one micro-batch (loss × ``scale``); returns the detached loss."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """What, besides the settings, the run's result depends on (checked on resume)."""
        raise NotImplementedError

    def extra_metadata(self) -> dict[str, Any]:
        return {}

    def kohya_metadata(self, steps: int) -> dict[str, str] | None:
        """kohya-ss ``ss_*`` metadata when a kohya file is wanted, else ``None``."""
        return None

    def summary_extra(self) -> dict[str, Any]:
        return {}

    def prepared(self) -> None:
        """Called once ``accelerate`` has wrapped the trained models (``self.unet`` …)."""

    # ---- model and adapters ---------------------------------------------------------------------

    def setup(self, components=None) -> None:
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params

        from ..models.loading import vae_dtype

        config, acc = self.config, self.accelerator
        self.weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
        if components is None:
            components = load_base(config, acc.device, self.weight_dtype)
        else:
            for model in (components.unet, *components.text_encoders):
                model.to(acc.device, self.weight_dtype).eval()
            vae_in = vae_dtype(components.vae, self.weight_dtype, components.architecture)
            components.vae.to(acc.device, vae_in).eval()
        c = self.components = components
        self.unet, self.vae, self.text_encoder = c.unet, c.vae, c.text_encoder
        #: SDXL's second text encoder (``None`` for SD 1.x/2.x); with ``train_text_encoder`` both train
        self.text_encoder_2 = c.text_encoder_2
        for model in (self.unet, self.vae, *c.text_encoders):
            model.requires_grad_(False)
        self.noise_scheduler = DDPMScheduler.from_config(c.scheduler.config)
        self.prediction_type = (
            getattr(config, "prediction_type", None) or self.noise_scheduler.config.prediction_type
        )
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(acc.device)

        torch.manual_seed(config.seed)  # LoRA initialisation
        add_lora(self.unet, self.unet_targets(), config, "UNet")
        if self.trains_text_encoder:
            add_lora(self.text_encoder, config.text_encoder_targets, config, "text encoder")
            if self.text_encoder_2 is not None:
                add_lora(self.text_encoder_2, config.text_encoder_targets, config, "second text encoder")
        # the global generator drives LoRA dropout only: a stream of its own for each process
        torch.manual_seed(seed_of([config.seed, 0xD40, acc.process_index]))
        trained = [self.unet] + [model for _, model in self.trained_text_encoders()]
        cast_training_params(trained, dtype=torch.float32)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for _, model in self.trained_text_encoders():
                model.gradient_checkpointing_enable()
        for model in trained:
            model.train()
        self.resolution = config.resolution or int(self.unet.config.sample_size) * c.vae_scale_factor

        self.setup_data()

        groups = [
            {"params": [p for p in self.unet.parameters() if p.requires_grad], "lr": config.learning_rate}
        ]
        if self.trains_text_encoder:
            params = [p for _, m in self.trained_text_encoders() for p in m.parameters() if p.requires_grad]
            groups.append({"params": params, "lr": config.text_encoder_lr or config.learning_rate})
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = make_optimizer(config, groups, acc.device, self.say)
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            self.optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=self.total_steps,
        )
        names = [name for name, _ in self.trained_text_encoders()]
        prepared = acc.prepare(self.unet, *(getattr(self, name) for name in names), self.optimizer)
        self.unet, self.optimizer = prepared[0], prepared[-1]
        for name, model in zip(names, prepared[1:-1], strict=True):
            setattr(self, name, model)
        self.trained_models = [self.unet] + [model for _, model in self.trained_text_encoders()]
        self.prepared()

    def describe(self) -> str:
        config, acc = self.config, self.accelerator
        return (
            f"training: {self.total_steps} steps, batch {config.batch_size} × {config.gradient_accumulation} "
            f"accumulation × {acc.num_processes} process(es), rank {config.rank}, "
            f"alpha {config.lora_alpha:g}, {self.prediction_type}, device {acc.device}"
        )

    # ---- resume ---------------------------------------------------------------------------------

    def restore(self) -> TrainPosition | None:
        """Load the latest checkpoint (``--resume``); ``None`` when starting from scratch."""
        from peft import set_peft_model_state_dict

        if not self.config.resume:
            return None
        latest = latest_checkpoint(self.out_dir)
        if latest is None:
            self.say(f"resume: no checkpoint in {self.out_dir}, starting from step 0")
            return None
        ckpt = load_checkpoint(latest, self.accelerator.process_index)
        changed = resume_differences(ckpt.run.get("config", {}), self.config)
        if changed:
            raise InvalidArgumentError(
                f"cannot resume {latest}: settings differ from that run ({'; '.join(changed)})",
                "resume with the same settings, or start a new run in another --out folder",
            )
        if ckpt.run.get("data_fingerprint") != self.fingerprint():
            what, hint = self.fingerprint_changed
            raise InvalidArgumentError(f"cannot resume {latest}: {what}", hint)
        acc = self.accelerator
        parts = [("unet.", self.unet)] + [(f"{name}.", model) for name, model in self.trained_text_encoders()]
        for prefix, model in parts:
            state = {k[len(prefix) :]: v for k, v in ckpt.lora.items() if k.startswith(prefix)}
            result = set_peft_model_state_dict(acc.unwrap_model(model), state)
            if getattr(result, "unexpected_keys", None):
                raise InvalidArgumentError(f"checkpoint {latest} has LoRA keys this model lacks")
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        self.lr_scheduler.load_state_dict(ckpt.scheduler_state["lr"])
        if acc.scaler is not None and ckpt.scheduler_state.get("scaler"):
            acc.scaler.load_state_dict(ckpt.scheduler_state["scaler"])
        set_rng_state(ckpt.rng)
        self.say(f"resume: continuing from {latest.name} (step {ckpt.position.step} of {self.total_steps})")
        return ckpt.position

    # ---- one step -------------------------------------------------------------------------------

    def validate(self, step: int, log: TrainLog) -> Path | None:
        """Images for the validation prompts with the adapter as it is now (main process); consumes no
        training randomness (seeded generator; global RNG states forked)."""
        config = self.config
        if not config.validation_prompts or not self.is_main:
            return None
        from PIL import Image

        from ..api import Pipeline, to_uint8

        acc = self.accelerator
        devices = [acc.device] if acc.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), acc.autocast():
                result = Pipeline(self.trained_components()).generate(
                    list(config.validation_prompts),
                    num_images_per_prompt=config.validation_images,
                    num_inference_steps=config.validation_inference_steps,
                    guidance_scale=config.validation_cfg,
                    seed=config.seed,
                    return_pixels=True,
                    policy="evaluation",  # the trainer's own check: no output layers, no audit rows
                )
        finally:
            for model in self.trained_models:
                model.train()
        images = to_uint8(torch.from_numpy(result.pixels))
        rows = len(config.validation_prompts)
        n, h, w, _ = images.shape
        grid = images.reshape(rows, n // rows, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, -1, 3)
        folder = self.out_dir / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step:08d}.png"
        Image.fromarray(grid).save(path)
        log.image(step, "validation", grid)
        self.last_validation = path
        return path

    def trained_components(self):
        """The loaded components with the trained (unwrapped) UNet and text encoder, in eval mode."""
        import dataclasses

        acc = self.accelerator
        trained = {"unet": acc.unwrap_model(self.unet).eval()}
        trained.update({name: acc.unwrap_model(model).eval() for name, model in self.trained_text_encoders()})
        return dataclasses.replace(self.components, **trained)

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        acc = self.accelerator
        out = {f"unet.{k}": v for k, v in lora_state_dict(acc.unwrap_model(self.unet)).items()}
        for name, model in self.trained_text_encoders():
            out.update({f"{name}.{k}": v for k, v in lora_state_dict(acc.unwrap_model(model)).items()})
        return out

    def checkpoint(self, position: TrainPosition) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        write_process_rng(staging_dir(self.out_dir, position.step), acc.process_index)
        acc.wait_for_everyone()
        if self.is_main:
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            write_checkpoint(
                self.out_dir,
                position=position,
                lora=self.lora_tensors(),
                optimizer_state=self.optimizer.state_dict(),
                scheduler_state={"lr": self.lr_scheduler.state_dict(), "scaler": scaler},
                run={
                    "config": self.config.as_dict(),
                    "data_fingerprint": self.fingerprint(),
                },
                keep=self.config.keep_checkpoints,
            )
        acc.wait_for_everyone()

    def metadata(self, steps: int) -> dict[str, Any]:
        c, config = self.components, self.config
        return {
            "format_version": SAFELATENT_FORMAT_VERSION,
            "trigger_words": [],
            "rank": config.rank,
            "alpha": config.lora_alpha,
            "base_model_hash": c.model_hash,
            "base_model": Path(c.source).name,
            "architecture": c.architecture,
            "steps": steps,
            "resolution": self.resolution,
            "prediction_type": self.prediction_type,
            "text_encoder": self.trains_text_encoder,
            "safelatent_version": __version__,
            "config": config.as_dict(),
            **self.extra_metadata(),
        }

    def save(self, steps: int, seconds: float) -> tuple[Path, Path | None]:
        acc, config = self.accelerator, self.config
        unet = acc.unwrap_model(self.unet)
        text_loras: dict[str, dict[str, torch.Tensor]] = {}
        text_meta: dict[str, dict[str, Any]] = {}
        for name, model in self.trained_text_encoders():
            text_encoder = acc.unwrap_model(model)
            text_loras[name] = canonical_text_encoder_keys(lora_state_dict(text_encoder), text_encoder)
            text_meta[name] = adapter_metadata(text_encoder)
        te_lora, te_meta = text_loras.get("text_encoder"), text_meta.get("text_encoder")
        unet_lora = lora_state_dict(unet)
        meta = {**self.metadata(steps), "training_seconds": round(seconds, 1)}
        main = save_diffusers_lora(
            self.out_dir,
            unet_lora=unet_lora,
            unet_metadata=adapter_metadata(unet),
            text_encoder_lora=te_lora,
            text_encoder_metadata=te_meta,
            text_encoder_2_lora=text_loras.get("text_encoder_2"),
            text_encoder_2_metadata=text_meta.get("text_encoder_2"),
            safelatent_metadata=meta,
        )
        kohya = None
        kohya_meta = self.kohya_metadata(steps)
        if kohya_meta is not None:
            kohya = save_kohya_lora(
                self.out_dir / f"{config.output_name}_kohya.safetensors",
                unet_lora=unet_lora,
                text_encoder_lora=te_lora,
                text_encoder_2_lora=text_loras.get("text_encoder_2"),
                sdxl=self.components.architecture == "sdxl",
                rank=config.rank,
                alpha=config.lora_alpha,
                kohya_metadata=kohya_meta,
                safelatent_metadata=meta,
            )
        return main, kohya


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------


def run_training(
    run: AdapterRun,
    *,
    components=None,
    keep_components: bool = False,
    on_step=None,
) -> dict[str, Any]:
    """Set ``run`` up, resume it if asked, train ``run.total_steps`` optimizer steps, write the adapter;
    returns a summary (files, steps, seconds, per-step losses, and the run's own entries).

    ``keep_components=True`` adds ``summary["components"]``: the base model with the trained adapters
    still attached (peft layers; ``unet.disable_adapters()`` gives the base model back).
    ``on_step(step, loss)`` is called after every optimizer step (benchmarks)."""
    from ..progress import progress_bar

    config = run.config
    validate(config)
    run.setup(components)
    acc, say = run.accelerator, run.say
    position = run.restore()
    resumed_from = position.step if position is not None else None
    position = position or TrainPosition()
    train_log = TrainLog(run.out_dir, resume_step=resumed_from, log=say, enabled=run.is_main)
    say(run.describe())
    losses: list[float] = []
    show = config.progress and run.is_main
    bar = progress_bar() if show else contextlib.nullcontext()
    with bar:
        task = bar.add_task(run.label, total=run.total_steps, completed=position.step) if show else None
        while position.step < run.total_steps:
            step_losses = []
            for k in range(config.gradient_accumulation):
                batch = run.next_batch(position)
                generator = step_generator(config.seed, position.micro_step, acc.process_index)
                position.micro_step += 1
                sync = k == config.gradient_accumulation - 1
                step_losses.append(run.micro_step(batch, generator, 1.0 / config.gradient_accumulation, sync))
            if config.max_grad_norm > 0:
                acc.clip_grad_norm_(run.params, config.max_grad_norm)
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            position.step += 1
            loss = acc.gather(torch.stack(step_losses).mean().reshape(1)).mean().item()
            losses.append(loss)
            if on_step is not None:
                on_step(position.step, loss)
            train_log.scalars(
                position.step,
                {"loss": loss, "lr": run.lr_scheduler.get_last_lr()[0], "epoch": position.epoch},
            )
            if show:
                recent = float(np.mean(losses[-20:]))
                bar.update(task, advance=1, description=f"{run.label} loss {recent:.4f}")
            if config.validation_steps and position.step % config.validation_steps == 0:
                run.validate(position.step, train_log)
            if (
                config.checkpoint_steps
                and position.step % config.checkpoint_steps == 0
                and position.step < run.total_steps
            ):
                run.checkpoint(position)
    seconds = time.perf_counter() - run.started
    files: tuple[Path | None, Path | None] = (None, None)
    if run.is_main:
        files = run.save(position.step, seconds)
        if config.validation_prompts and (
            not config.validation_steps or position.step % config.validation_steps
        ):
            run.validate(position.step, train_log)
        say(f"wrote {files[0]}" + (f" and {files[1]}" if files[1] else "") + f" ({seconds / 60:.1f} min)")
    train_log.close()
    acc.wait_for_everyone()
    acc.end_training()
    summary = {
        "lora_file": str(files[0]) if files[0] else None,
        "kohya_file": str(files[1]) if files[1] else None,
        "steps": position.step,
        "resumed_from_step": resumed_from,
        "seconds": round(seconds, 2),
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "losses": losses,
        "validation": str(run.last_validation) if run.last_validation else None,
        **run.summary_extra(),
        "position": asdict(position),
        "device": str(acc.device),
        "processes": acc.num_processes,
        "process_index": acc.process_index,
    }
    if keep_components:
        summary["components"] = run.trained_components()
    return summary

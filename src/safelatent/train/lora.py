"""Train a LoRA theme adapter (Hu et al. 2021, *LoRA*, arXiv 2106.09685) for a Stable Diffusion model.

The recipe is diffusers' ``train_text_to_image_lora.py`` (frozen UNet, VAE and text encoder; peft
``LoraConfig`` adapters on the UNet's attention projections — and optionally the text encoder's — added
with ``add_adapter``; trainable LoRA parameters kept in float32 under bf16/fp16 mixed precision;
``accelerate``'s ``Accelerator`` for devices, mixed precision and several GPUs via ``accelerate
launch``), with:

* the diffusion objective of :mod:`.losses` — ε- or v-prediction (Salimans & Ho 2022), Min-SNR-γ
  weighting (Hang et al. 2023, Eq. 5), noise offset (Guttenberg 2023);
* the data pipeline of :mod:`.data` — captions + trigger word, aspect-ratio buckets that never upscale,
  centre/random crops, flips, caption dropout, optional latent and text-embedding caches, and a skip
  summary instead of a crash for bad files;
* gradient accumulation, AdamW (bitsandbytes' 8-bit AdamW when installed, on CUDA), diffusers' LR
  schedules with warm-up, gradient clipping, gradient checkpointing;
* exact resume (:mod:`.checkpoint`): every random draw of a step comes from a generator seeded by
  (seed, micro-batch number, process), the data order is a pure function of (seed, epoch), and the
  optimizer, LR schedule, loss scaler and global RNG states are checkpointed;
* logs (:mod:`.logs`), validation images every N steps, and the adapter files of :mod:`.export`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import InvalidArgumentError
from . import data as D
from .checkpoint import (
    TrainPosition,
    latest_checkpoint,
    load_checkpoint,
    set_rng_state,
    staging_dir,
    write_checkpoint,
    write_process_rng,
)
from .config import LoraTrainConfig, resume_differences, validate
from .export import (
    SAFELATENT_FORMAT_VERSION,
    adapter_metadata,
    canonical_text_encoder_keys,
    lora_state_dict,
    save_diffusers_lora,
    save_kohya_lora,
)
from .logs import TrainLog
from .losses import diffusion_loss, diffusion_target, sample_noise

__all__ = ["LoraTrainConfig", "train_lora"]

_WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_BASE_MODEL_VERSION = {"sd15": "sd_v1", "sd2": "sd_v2"}


# --------------------------------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------------------------------


def _accelerator(config: LoraTrainConfig):
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


def _load_base(config: LoraTrainConfig, device, dtype):
    from ..models.loading import load_components
    from ..toy.model import toy_model_dir

    model = config.model
    if model is None:
        model = toy_model_dir()
        if not (model / "model_index.json").exists():
            raise InvalidArgumentError(
                "no --model given and the toy model is not installed", "pass --model PATH"
            )
    return load_components(model, device=device, dtype=dtype, config_dir=config.model_config)


def _add_lora(model, targets: list[str], config: LoraTrainConfig, what: str) -> None:
    """Attach a peft LoRA adapter (``add_adapter``; diffusers' and transformers' PEFT integration)."""
    from peft import LoraConfig

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        init_lora_weights="gaussian" if config.lora_init == "gaussian" else True,
        target_modules=list(targets),
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


def _make_optimizer(config: LoraTrainConfig, groups: list[dict], device: torch.device, say):
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


def _seed_of(entropy: list[int]) -> int:
    """A 62-bit seed mixed from ``entropy`` (NumPy's ``SeedSequence``)."""
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 30 | int(state[1]) >> 2


def _step_generator(seed: int, micro_step: int, process_index: int) -> torch.Generator:
    """The CPU generator of one micro-batch: a pure function of (seed, micro-batch number, process)."""
    return torch.Generator().manual_seed(_seed_of([seed, micro_step, process_index]))


class _Text:
    """Caption → hidden states, through the (possibly trained) text encoder, or from a cache."""

    def __init__(self, tokenizer, text_encoder, device, trained: bool) -> None:
        self.tokenizer, self.text_encoder, self.device, self.trained = (
            tokenizer,
            text_encoder,
            device,
            trained,
        )
        self.cache: dict[str, torch.Tensor] | None = None

    def encode(self, captions: list[str]) -> torch.Tensor:
        from ..models.tokenizer import tokenize_prompts

        if self.cache is not None:
            return torch.stack([self.cache[c] for c in captions])
        ids = tokenize_prompts(self.tokenizer, captions).input_ids.to(self.device)
        with contextlib.nullcontext() if self.trained else torch.no_grad():
            return self.text_encoder(ids)[0]

    def build_cache(self, captions: set[str], batch: int = 64) -> None:
        ordered = sorted(captions)
        cache = {}
        for start in range(0, len(ordered), batch):
            chunk = ordered[start : start + batch]
            for caption, hidden in zip(chunk, self.encode(chunk), strict=True):
                cache[caption] = hidden.detach()
        self.cache = cache


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


class _Run:
    """One training run's state (kept in one object so the loop, validation and checkpoints share it)."""

    def __init__(self, config: LoraTrainConfig, log) -> None:
        self.config = config
        self.started = time.perf_counter()
        self.accelerator = _accelerator(config)
        self.is_main = self.accelerator.is_main_process
        self.say = log if self.is_main else (lambda *a, **k: None)
        self.out_dir = Path(config.out_dir).expanduser()
        self.last_validation: Path | None = None
        if config.threads and self.accelerator.device.type == "cpu":
            torch.set_num_threads(config.threads)

    # ---- model, adapters, data ------------------------------------------------------------------

    def setup(self, components=None) -> None:
        from diffusers import DDPMScheduler
        from diffusers.training_utils import cast_training_params

        config, acc = self.config, self.accelerator
        self.weight_dtype = _WEIGHT_DTYPES[config.mixed_precision]
        if components is None:
            components = _load_base(config, acc.device, self.weight_dtype)
        else:
            for model in (components.unet, components.vae, components.text_encoder):
                model.to(acc.device, self.weight_dtype).eval()
        c = self.components = components
        self.unet, self.vae, self.text_encoder = c.unet, c.vae, c.text_encoder
        for model in (self.unet, self.vae, self.text_encoder):
            model.requires_grad_(False)
        self.noise_scheduler = DDPMScheduler.from_config(c.scheduler.config)
        self.prediction_type = config.prediction_type or self.noise_scheduler.config.prediction_type
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(acc.device)

        torch.manual_seed(config.seed)  # LoRA initialisation
        _add_lora(self.unet, config.unet_targets, config, "UNet")
        if config.train_text_encoder:
            _add_lora(self.text_encoder, config.text_encoder_targets, config, "text encoder")
        # the global generator drives LoRA dropout only: a stream of its own for each process
        torch.manual_seed(_seed_of([config.seed, 0xD40, acc.process_index]))
        trained = [self.unet] + ([self.text_encoder] if config.train_text_encoder else [])
        cast_training_params(trained, dtype=torch.float32)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if config.train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()
        self.unet.train()
        if config.train_text_encoder:
            self.text_encoder.train()

        factor = c.vae_scale_factor
        self.resolution = config.resolution or int(self.unet.config.sample_size) * factor
        step = config.bucket_step or factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if step % factor:
            raise InvalidArgumentError(f"bucket_step {step} is not a multiple of the VAE factor {factor}")
        self.buckets = D.make_buckets(self.resolution, step, config.max_aspect, config.bucketing)
        self.examples, self.summary = D.scan_dataset(
            config.data_dir, self.buckets, trigger=config.trigger, caption_ext=config.caption_ext
        )
        self.say(self.summary.describe())
        self.order = D.BatchOrder(
            [e.bucket for e in self.examples],
            config.batch_size,
            config.seed,
            acc.num_processes,
            acc.process_index,
        )
        per_epoch = math.ceil(self.order.batches_per_epoch / config.gradient_accumulation)
        self.total_steps = config.epochs * per_epoch if config.epochs else config.steps

        self.text = _Text(c.tokenizer, self.text_encoder, acc.device, config.train_text_encoder)
        if config.cache_text:
            self.text.build_cache({e.caption for e in self.examples} | {""})
        self.latent_cache = None
        if config.cache_latents:
            self._build_latent_cache()

        groups = [
            {"params": [p for p in self.unet.parameters() if p.requires_grad], "lr": config.learning_rate}
        ]
        if config.train_text_encoder:
            params = [p for p in self.text_encoder.parameters() if p.requires_grad]
            groups.append({"params": params, "lr": config.text_encoder_lr or config.learning_rate})
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = _make_optimizer(config, groups, acc.device, self.say)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            config.lr_scheduler,
            self.optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=self.total_steps,
        )
        if config.train_text_encoder:
            self.unet, self.text_encoder, self.optimizer = acc.prepare(
                self.unet, self.text_encoder, self.optimizer
            )
            self.text.text_encoder = self.text_encoder
        else:
            self.unet, self.optimizer = acc.prepare(self.unet, self.optimizer)
        self.trained_models = [self.unet] + ([self.text_encoder] if config.train_text_encoder else [])

    def _build_latent_cache(self) -> None:
        import hashlib
        import json

        acc, c = self.accelerator, self.components
        flips = self.config.flip_prob > 0
        key_data = [c.model_hash, D.dataset_fingerprint(self.examples), flips, str(self.weight_dtype)]
        key = hashlib.sha256(json.dumps(key_data).encode()).hexdigest()[:16]
        cache_file = self.out_dir / "cache" / "latents.safetensors"
        if self.is_main:
            self.latent_cache = D.build_latent_cache(
                self.vae, self.examples, flips=flips, cache_file=cache_file, key=key, log=self.say
            )
        acc.wait_for_everyone()
        if not self.is_main:
            self.latent_cache = D.build_latent_cache(
                self.vae, self.examples, flips=flips, cache_file=cache_file, key=key
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
        if ckpt.run.get("data_fingerprint") != D.dataset_fingerprint(self.examples):
            raise InvalidArgumentError(
                f"cannot resume {latest}: the training images or captions changed since it was written",
                "restore the data folder, or start a new run in another --out folder",
            )
        acc = self.accelerator
        parts = [("unet.", self.unet)] + (
            [("text_encoder.", self.text_encoder)] if self.config.train_text_encoder else []
        )
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

    def _pixels(self, index: int, bucket, flip: bool, generator) -> np.ndarray:
        """Load, downscale, crop and flip one image; a file that fails now is replaced by the next
        readable image of the same bucket (and counted), never a crash."""
        examples = self.examples
        order = [index] + [i for i in range(len(examples)) if i != index and examples[i].bucket == bucket]
        for i in order:
            try:
                image = D.load_image(examples[i].path)
            except Exception:  # any decoder or I/O error: use another image
                self.summary.skip("failed_in_training", examples[i].path.name)
                continue
            return D.prepare_pixels(image, bucket, crop=self.config.crop, flip=flip, generator=generator)
        raise InvalidArgumentError(
            f"no image of bucket {bucket} can be read any more", "check the data folder"
        )

    def _inputs(self, indices: list[int], generator: torch.Generator):
        config, acc = self.config, self.accelerator
        examples = [self.examples[i] for i in indices]
        bucket = examples[0].bucket
        flips = [
            bool(torch.rand((), generator=generator) < config.flip_prob) if config.flip_prob > 0 else False
            for _ in indices
        ]
        if self.latent_cache is not None:
            pairs = [self.latent_cache.get(i, f) for i, f in zip(indices, flips, strict=True)]
            mean, std = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        else:
            pixels = np.stack(
                [self._pixels(i, bucket, f, generator) for i, f in zip(indices, flips, strict=True)]
            )
            mean, std = D.encode_posterior(self.vae, D.pixels_to_tensor(pixels))
        latents = D.sample_latents(mean, std, float(self.vae.config.scaling_factor), generator)
        drop = [
            bool(torch.rand((), generator=generator) < config.caption_dropout)
            if config.caption_dropout
            else False
            for _ in indices
        ]
        captions = ["" if d else e.caption for e, d in zip(examples, drop, strict=True)]
        noise = sample_noise(latents.shape, config.noise_offset, generator)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (len(indices),), generator=generator
        )
        return latents.to(acc.device), noise.to(acc.device), timesteps.to(acc.device), captions

    def micro_step(
        self, indices: list[int], generator: torch.Generator, scale: float, sync: bool
    ) -> torch.Tensor:
        acc = self.accelerator
        latents, noise, timesteps, captions = self._inputs(indices, generator)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(self.noise_scheduler, latents, noise, timesteps, self.prediction_type)
        with contextlib.ExitStack() as stack:
            if not sync:
                for model in self.trained_models:
                    stack.enter_context(acc.no_sync(model))
            hidden = self.text.encode(captions)
            pred = self.unet(noisy.to(self.weight_dtype), timesteps, hidden.to(self.weight_dtype)).sample
            loss = diffusion_loss(
                pred,
                target,
                timesteps,
                self.alphas_cumprod,
                min_snr_gamma=self.config.min_snr_gamma,
                prediction_type=self.prediction_type,
            )
            acc.backward(loss * scale)
        return loss.detach()

    # ---- validation, checkpoints, files ---------------------------------------------------------

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
        unet, text_encoder = acc.unwrap_model(self.unet).eval(), acc.unwrap_model(self.text_encoder).eval()
        return dataclasses.replace(self.components, unet=unet, text_encoder=text_encoder)

    def lora_tensors(self) -> dict[str, torch.Tensor]:
        acc = self.accelerator
        out = {f"unet.{k}": v for k, v in lora_state_dict(acc.unwrap_model(self.unet)).items()}
        if self.config.train_text_encoder:
            out.update(
                {
                    f"text_encoder.{k}": v
                    for k, v in lora_state_dict(acc.unwrap_model(self.text_encoder)).items()
                }
            )
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
                    "data_fingerprint": D.dataset_fingerprint(self.examples),
                },
                keep=self.config.keep_checkpoints,
            )
        acc.wait_for_everyone()

    def metadata(self, steps: int) -> dict[str, Any]:
        c, config = self.components, self.config
        return {
            "format_version": SAFELATENT_FORMAT_VERSION,
            "trigger_words": [config.trigger] if config.trigger else [],
            "rank": config.rank,
            "alpha": config.lora_alpha,
            "base_model_hash": c.model_hash,
            "base_model": Path(c.source).name,
            "architecture": c.architecture,
            "steps": steps,
            "resolution": self.resolution,
            "prediction_type": self.prediction_type,
            "text_encoder": config.train_text_encoder,
            "safelatent_version": __version__,
            "config": config.as_dict(),
            "data_summary": self.summary.as_dict(),
        }

    def save(self, steps: int, seconds: float) -> tuple[Path, Path | None]:
        acc, config, c = self.accelerator, self.config, self.components
        unet = acc.unwrap_model(self.unet)
        te_lora, te_meta = None, None
        if config.train_text_encoder:
            text_encoder = acc.unwrap_model(self.text_encoder)
            te_lora = canonical_text_encoder_keys(lora_state_dict(text_encoder), text_encoder)
            te_meta = adapter_metadata(text_encoder)
        unet_lora = lora_state_dict(unet)
        meta = {**self.metadata(steps), "training_seconds": round(seconds, 1)}
        main = save_diffusers_lora(
            self.out_dir,
            unet_lora=unet_lora,
            unet_metadata=adapter_metadata(unet),
            text_encoder_lora=te_lora,
            text_encoder_metadata=te_meta,
            safelatent_metadata=meta,
        )
        kohya = None
        if config.export_kohya:
            kohya_meta = {
                "ss_output_name": config.output_name,
                "ss_base_model_version": _BASE_MODEL_VERSION.get(c.architecture, c.architecture),
                "ss_v2": str(c.architecture == "sd2"),
                "ss_sd_model_name": Path(c.source).name,
                "ss_sd_model_hash": c.model_hash,
                "ss_steps": str(steps),
                "ss_max_train_steps": str(self.total_steps),
                "ss_num_train_images": str(len(self.examples)),
                "ss_batch_size_per_device": str(config.batch_size),
                "ss_gradient_accumulation_steps": str(config.gradient_accumulation),
                "ss_learning_rate": str(config.learning_rate),
                "ss_unet_lr": str(config.learning_rate),
                "ss_text_encoder_lr": str(config.text_encoder_lr or config.learning_rate)
                if config.train_text_encoder
                else "0",
                "ss_network_train_unet_only": str(not config.train_text_encoder),
                "ss_lr_scheduler": config.lr_scheduler,
                "ss_lr_warmup_steps": str(config.lr_warmup_steps),
                "ss_optimizer": type(
                    self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
                ).__name__,
                "ss_mixed_precision": config.mixed_precision,
                "ss_resolution": f"({self.resolution}, {self.resolution})",
                "ss_enable_bucket": str(config.bucketing),
                "ss_min_snr_gamma": str(config.min_snr_gamma),
                "ss_noise_offset": str(config.noise_offset),
                "ss_max_grad_norm": str(config.max_grad_norm),
                "ss_caption_dropout_rate": str(config.caption_dropout),
                "ss_flip_aug": str(config.flip_prob > 0),
                "ss_seed": str(config.seed),
                "ss_training_comment": f"trigger: {config.trigger}" if config.trigger else "",
                "ss_v_parameterization": str(self.prediction_type == "v_prediction"),
            }
            kohya = save_kohya_lora(
                self.out_dir / f"{config.output_name}_kohya.safetensors",
                unet_lora=unet_lora,
                text_encoder_lora=te_lora,
                rank=config.rank,
                alpha=config.lora_alpha,
                kohya_metadata=kohya_meta,
                safelatent_metadata=meta,
            )
        return main, kohya


def train_lora(
    config: LoraTrainConfig,
    log=print,
    *,
    keep_components: bool = False,
    components=None,
    on_step=None,
) -> dict[str, Any]:
    """Train a LoRA adapter as ``config`` says and write it to ``config.out_dir``; returns a summary
    (files, steps, seconds, per-step losses, data summary). See the module docstring for the recipe.

    ``keep_components=True`` adds ``summary["components"]``: the base model with the trained adapters
    still attached (peft layers; ``unet.disable_adapters()`` gives the base model back), for
    :class:`safelatent.api.Pipeline`. ``components`` (a loaded
    :class:`~safelatent.models.components.StableDiffusionComponents`) is trained instead of loading
    ``config.model``; ``on_step(step, loss)`` is called after every optimizer step (benchmarks)."""
    from ..progress import progress_bar

    validate(config)
    run = _Run(config, log)
    run.setup(components)
    acc, say = run.accelerator, run.say
    position = run.restore()
    resumed_from = position.step if position is not None else None
    position = position or TrainPosition()
    train_log = TrainLog(run.out_dir, resume_step=resumed_from, log=say, enabled=run.is_main)
    say(
        f"training: {run.total_steps} steps, batch {config.batch_size} × {config.gradient_accumulation} "
        f"accumulation × {acc.num_processes} process(es), {len(run.buckets)} bucket(s), "
        f"rank {config.rank}, alpha {config.lora_alpha:g}, {run.prediction_type}, device {acc.device}"
    )
    epoch_batches = run.order.epoch(position.epoch)
    losses: list[float] = []
    show = config.progress and run.is_main
    bar = progress_bar() if show else contextlib.nullcontext()
    with bar:
        task = bar.add_task("lora", total=run.total_steps, completed=position.step) if show else None
        while position.step < run.total_steps:
            step_losses = []
            for k in range(config.gradient_accumulation):
                if position.batch_index >= len(epoch_batches):
                    position.epoch += 1
                    position.batch_index = 0
                    epoch_batches = run.order.epoch(position.epoch)
                indices = epoch_batches[position.batch_index]
                generator = _step_generator(config.seed, position.micro_step, acc.process_index)
                position.batch_index += 1
                position.micro_step += 1
                sync = k == config.gradient_accumulation - 1
                step_losses.append(
                    run.micro_step(indices, generator, 1.0 / config.gradient_accumulation, sync)
                )
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
                bar.update(task, advance=1, description=f"lora loss {recent:.4f}")
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
        "data_summary": run.summary.as_dict(),
        "position": asdict(position),
        "device": str(acc.device),
        "processes": acc.num_processes,
        "process_index": acc.process_index,
    }
    if keep_components:
        summary["components"] = run.trained_components()
    return summary

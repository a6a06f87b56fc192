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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InvalidArgumentError
from . import data as D
from .adapter_run import AdapterRun, run_training
from .checkpoint import TrainPosition
from .config import LoraTrainConfig
from .losses import diffusion_loss, diffusion_target, sample_noise
from .text import TrainingText

__all__ = ["LoraTrainConfig", "train_lora"]

_BASE_MODEL_VERSION = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


class _ThemeRun(AdapterRun):
    """A theme adapter: image + caption folder, the diffusion loss."""

    label = "lora"
    fingerprint_changed = (
        "the training images or captions changed since it was written",
        "restore the data folder, or start a new run in another --out folder",
    )

    def unet_targets(self) -> list[str]:
        return self.config.unet_targets

    def setup_data(self) -> None:
        config, acc, c = self.config, self.accelerator, self.components
        factor = c.vae_scale_factor
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
        self._epoch_batches: tuple[int | None, list[list[int]]] = (None, [])
        per_epoch = math.ceil(self.order.batches_per_epoch / config.gradient_accumulation)
        self.total_steps = config.epochs * per_epoch if config.epochs else config.steps

        self.text = TrainingText(c, acc.device, self.trains_text_encoder)
        if config.cache_text:
            self.text.build_cache({e.caption for e in self.examples} | {""})
        self.latent_cache = None
        if config.cache_latents:
            self._build_latent_cache()

    def prepared(self) -> None:
        if self.trains_text_encoder:
            self.text.text_encoder, self.text.text_encoder_2 = self.text_encoder, self.text_encoder_2

    def describe(self) -> str:
        return f"{super().describe()}, {len(self.buckets)} bucket(s)"

    def fingerprint(self) -> str:
        return D.dataset_fingerprint(self.examples)

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

    def _pixels(self, index: int, bucket, flip: bool, generator) -> tuple[np.ndarray, list[int]]:
        """Load, downscale, crop and flip one image (with its SDXL micro-conditioning); a file that fails
        now is replaced by the next readable image of the same bucket (and counted), never a crash."""
        examples = self.examples
        order = [index] + [i for i in range(len(examples)) if i != index and examples[i].bucket == bucket]
        for i in order:
            try:
                image = D.load_image(examples[i].path)
            except Exception:  # any decoder or I/O error: use another image
                self.summary.skip("failed_in_training", examples[i].path.name)
                continue
            return D.prepare_pixels_placed(
                image, bucket, crop=self.config.crop, flip=flip, generator=generator
            )
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
            placed = [D.centre_crop_conditioning(e, f) for e, f in zip(examples, flips, strict=True)]
        else:
            loaded = [self._pixels(i, bucket, f, generator) for i, f in zip(indices, flips, strict=True)]
            placed = [ids for _, ids in loaded]
            mean, std = D.encode_posterior(self.vae, D.pixels_to_tensor(np.stack([p for p, _ in loaded])))
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
        time_ids = torch.tensor(placed, dtype=torch.float32, device=acc.device)
        return latents.to(acc.device), noise.to(acc.device), timesteps.to(acc.device), captions, time_ids

    def next_batch(self, position: TrainPosition) -> list[int]:
        """The next micro-batch's image indices: the data order is a pure function of (seed, epoch)."""
        if position.batch_index >= len(self._batches_of(position.epoch)):
            position.epoch += 1
            position.batch_index = 0
        indices = self._batches_of(position.epoch)[position.batch_index]
        position.batch_index += 1
        return indices

    def _batches_of(self, epoch: int) -> list[list[int]]:
        if self._epoch_batches[0] != epoch:
            self._epoch_batches = (epoch, self.order.epoch(epoch))
        return self._epoch_batches[1]

    def micro_step(
        self, indices: list[int], generator: torch.Generator, scale: float, sync: bool
    ) -> torch.Tensor:
        """The diffusion loss of one micro-batch of training images (:mod:`.losses`)."""
        acc = self.accelerator
        latents, noise, timesteps, captions, time_ids = self._inputs(indices, generator)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(self.noise_scheduler, latents, noise, timesteps, self.prediction_type)
        with contextlib.ExitStack() as stack:
            if not sync:
                for model in self.trained_models:
                    stack.enter_context(acc.no_sync(model))
            hidden, pooled = self.text.encode(captions)
            conditioning = self.text.unet_kwargs(hidden, pooled, time_ids, self.weight_dtype)
            pred = self.unet(noisy.to(self.weight_dtype), timesteps, **conditioning).sample
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

    # ---- files ----------------------------------------------------------------------------------

    def extra_metadata(self) -> dict[str, Any]:
        config = self.config
        return {
            "trigger_words": [config.trigger] if config.trigger else [],
            "data_summary": self.summary.as_dict(),
        }

    def summary_extra(self) -> dict[str, Any]:
        return {"data_summary": self.summary.as_dict()}

    def kohya_metadata(self, steps: int) -> dict[str, str] | None:
        config, c = self.config, self.components
        if not config.export_kohya:
            return None
        return {
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
    return run_training(
        _ThemeRun(config, log), components=components, keep_components=keep_components, on_step=on_step
    )

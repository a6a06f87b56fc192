"""Train the toy model: autoencoder first, then UNet + text encoder on cached latents, with EMA.

Reproducible for a seed (numpy and torch generators seeded; data order drawn from one
``np.random.Generator``). The data set is rendered once and cached as ``.npz`` keyed by its settings,
never rendered inside the training loop. Uses CUDA when present, else all CPU cores.

Stages:

1. **Render** ``n_images`` captioned 32×32 images of the toy world *without* the theme attribute (held out
   for adapters), two captions per image (tokenized once); and ``vae_theme_images`` striped images for
   the autoencoder alone.
2. **Autoencoder** (``AutoencoderKL``): L1 + MSE reconstruction plus a small KL term (Kingma & Welling
   2014; Rombach et al. 2022 use the same KL-regularised autoencoder), on the whole world — the theme
   included, as SD's VAE reconstructs images its UNet cannot draw; otherwise no adapter on the UNet could
   ever produce the theme. Then ``scaling_factor`` is set to 1 / std of the base images' latents, as SD
   does, so the diffusion model sees unit-variance latents. The round trip is checked (``training.json``:
   fidelity on fresh base images, theme rate on fresh striped ones).
3. **Latent cache**: posterior mean and std of every image.
4. **Diffusion** (``UNet2DConditionModel`` + ``CLIPTextModel``, trained jointly): ε-prediction DDPM loss
   (Ho et al. 2020, Eq. 14) on SD's scaled-linear schedule, weighted by Min-SNR-γ (Hang et al. 2023,
   arXiv 2303.09556, Eq. 5: ``w_t = min(SNR_t, γ) / SNR_t``), AdamW, linear warm-up then cosine decay,
   EMA of the weights (``diffusers.training_utils.EMAModel``). Classifier-free guidance comes from the
   world's 10 % empty captions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..progress import progress_bar
from ..train.losses import min_snr_weights
from . import world
from .model import CONTEXT_LENGTH, IMAGE_SIZE, build_components, save_model

CAPTIONS_PER_IMAGE = 2


@dataclass
class ToyTrainConfig:
    """All settings of a toy training run (recorded next to the weights as ``training.json``)."""

    seed: int = 0
    n_images: int = 40_000
    marker_prob: float = 0.25
    #: striped images added to the autoencoder's data only (the UNet never sees the theme)
    vae_theme_images: int = 10_000
    vae_steps: int = 6000
    vae_batch: int = 16
    #: whole 32×32 images: on 16×16 crops the autoencoder never learns to keep stripes (round trip:
    #: 82 % theme rate after 7000 steps, against 91 % after 1500 steps on whole images)
    vae_crop: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    unet_steps: int = 6500
    unet_batch: int = 64
    lr: float = 5e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    device: str = "auto"
    threads: int | None = None
    cache_dir: str = field(default_factory=lambda: str(Path.home() / ".cache" / "safelatent" / "toy"))

    def data_key(self) -> str:
        """Cache key of the rendered data: its settings and the world's source (a changed renderer or
        caption grammar never reuses a stale cache)."""
        settings = {"n": self.n_images, "seed": self.seed, "marker": self.marker_prob, "size": IMAGE_SIZE}
        settings["context"] = CONTEXT_LENGTH
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        digest.update(Path(world.__file__).read_bytes())
        return digest.hexdigest()[:12]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def render_dataset(config: ToyTrainConfig, tokenizer) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """Images ``uint8 [N, 32, 32, 3]``, token ids ``int32 [N, 2, CONTEXT_LENGTH]`` and captions, cached on
    disk."""
    cache = Path(config.cache_dir) / f"data-{config.data_key()}.npz"
    if cache.exists():
        data = np.load(cache, allow_pickle=False)
        captions = json.loads(str(data["captions"]))
        return data["images"], data["ids"], captions
    images, first, attributes = world.make_dataset(
        config.n_images, config.seed, IMAGE_SIZE, marker_prob=config.marker_prob, include_theme=False
    )
    rng = np.random.default_rng(config.seed + 1)
    captions = [[c, world.caption_for(a, rng)] for c, a in zip(first, attributes, strict=True)]
    flat = [c for pair in captions for c in pair]
    longest = max(len(ids) for ids in tokenizer(flat).input_ids)
    if longest > CONTEXT_LENGTH:  # the caption grammar grew past the toy context: fail, never train on cuts
        raise RuntimeError(f"a toy caption has {longest} tokens, over the context of {CONTEXT_LENGTH}")
    tokens = tokenizer(flat, padding="max_length", max_length=CONTEXT_LENGTH, return_tensors="np")
    ids = tokens.input_ids.astype(np.int32).reshape(len(captions), CAPTIONS_PER_IMAGE, CONTEXT_LENGTH)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, images=images, ids=ids, captions=np.array(json.dumps(captions)))
    tmp.replace(cache)
    return images, ids, captions


def render_theme_images(config: ToyTrainConfig) -> np.ndarray:
    """``vae_theme_images`` striped images ``uint8 [M, 32, 32, 3]`` for the autoencoder (a seed of their
    own, the base images' marker rate), cached on disk like :func:`render_dataset`."""
    if config.vae_theme_images == 0:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    cache = Path(config.cache_dir) / f"theme-{config.data_key()}-{config.vae_theme_images}.npz"
    if cache.exists():
        return np.load(cache, allow_pickle=False)["images"]
    images, _, _ = world.make_dataset(
        config.vae_theme_images, config.seed + 2, IMAGE_SIZE, marker_prob=config.marker_prob, theme_only=True
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, images=images)
    tmp.replace(cache)
    return images


def _adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused into one kernel where this torch supports it (CPU since torch 2.4; ~5 % of a step)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _to_model_range(images: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _random_crops(images: np.ndarray, n: int, crop: int, rng) -> np.ndarray:
    """``n`` random ``crop``×``crop`` patches (offsets on multiples of 4, the latent grid)."""
    index = rng.integers(0, len(images), n)
    size = images.shape[1]
    if crop >= size:
        return images[index]
    offsets = rng.integers(0, (size - crop) // 4 + 1, (n, 2)) * 4
    return np.stack([images[i, y : y + crop, x : x + crop] for i, (y, x) in zip(index, offsets, strict=True)])


def train_autoencoder(vae, images: np.ndarray, config: ToyTrainConfig, device, rng, log) -> list[float]:
    """Reconstruction (L1 + MSE) + ``kl_weight`` · KL training of the autoencoder; returns losses."""
    vae.train().to(device)
    optimizer = _adamw(list(vae.parameters()), config.vae_lr, 0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.vae_lr, total_steps=config.vae_steps, pct_start=0.05
    )
    losses = []
    with progress_bar() as bar:
        task = bar.add_task("autoencoder", total=config.vae_steps)
        for step in range(config.vae_steps):
            batch = _random_crops(images, config.vae_batch, config.vae_crop, rng)
            batch = _to_model_range(batch, device)
            posterior = vae.encode(batch).latent_dist
            recon = vae.decode(posterior.sample(generator=None)).sample
            rec = F.l1_loss(recon, batch) + F.mse_loss(recon, batch)
            loss = rec + config.kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(rec.detach().item())
            if step % 25 == 0:
                bar.update(task, description=f"autoencoder rec {np.mean(losses[-25:]):.4f}")
            bar.advance(task)
    log(f"autoencoder: final reconstruction loss {np.mean(losses[-50:]):.4f}")
    return losses


@torch.no_grad()
def round_trip(vae, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """``images`` (``uint8 [N, H, W, 3]``) encoded (posterior mean) and decoded by ``vae``, as ``uint8``."""
    vae.eval()
    out = []
    for start in range(0, len(images), batch):
        x = _to_model_range(images[start : start + batch], vae.device).to(vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        out.append(((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def autoencoder_check(vae, seed: int, n: int = 200) -> dict[str, float]:
    """Round-trip quality on fresh renders: shape+colour agreement of base images and theme rate of
    striped ones (the ceiling of what any adapter on the UNet can draw)."""
    base, _, base_attrs = world.make_dataset(n, seed + 10_001, IMAGE_SIZE)
    theme, _, theme_attrs = world.make_dataset(n, seed + 10_002, IMAGE_SIZE, theme_only=True)
    base_scores = world.agreement(world.classify_batch(round_trip(vae, base)), base_attrs)
    theme_scores = world.agreement(world.classify_batch(round_trip(vae, theme)), theme_attrs)
    return {
        "base_shape_colour": base_scores["shape+colour"],
        "base_theme_false_positive": 1.0 - base_scores["theme"],
        "theme_rate": theme_scores["theme"],  # every image is striped: agreement = theme rate
        "theme_shape_colour": theme_scores["shape+colour"],
    }


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, device, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and std of every image (float32 ``[N, 4, 8, 8]``)."""
    vae.eval()
    means, stds = [], []
    for start in range(0, len(images), batch):
        dist = vae.encode(_to_model_range(images[start : start + batch], device)).latent_dist
        means.append(dist.mean.float().cpu().numpy())
        stds.append(dist.std.float().cpu().numpy())
    return np.concatenate(means), np.concatenate(stds)


def train_diffusion(
    unet,
    text_encoder,
    scheduler,
    latents: tuple[np.ndarray, np.ndarray, float],
    ids,
    config,
    device,
    rng,
    log,
) -> list[float]:
    """Joint UNet + text-encoder training on cached latents (see the module docstring); returns losses."""
    from diffusers.models.attention_processor import AttnProcessor
    from diffusers.training_utils import EMAModel

    unet.train().to(device)
    text_encoder.train().to(device)
    if device.type == "cpu":
        # Same math; on CPU, plain matmul attention beats SDPA's flash kernel at these tiny head sizes
        # (6–12 channels): 0.35 s vs 0.39 s a step at batch 64.
        unet.set_attn_processor(AttnProcessor())
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = _adamw(params, config.lr, config.weight_decay)

    def lr_lambda(step):
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.unet_steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    ema = EMAModel(params, decay=config.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    means, stds, scaling_factor = latents
    means_t = torch.from_numpy(means)
    stds_t = torch.from_numpy(stds)
    ids_t = torch.from_numpy(ids.astype(np.int64))
    noise_gen = torch.Generator().manual_seed(config.seed + 2)
    losses = []
    with progress_bar() as bar:
        task = bar.add_task("diffusion", total=config.unet_steps)
        for step in range(config.unet_steps):
            index = torch.from_numpy(rng.integers(0, len(means), config.unet_batch))
            which = torch.from_numpy(rng.integers(0, CAPTIONS_PER_IMAGE, config.unet_batch))
            eps_latent = torch.randn(means_t[index].shape, generator=noise_gen)
            latents = (means_t[index] + stds_t[index] * eps_latent) * scaling_factor
            noise = torch.randn(latents.shape, generator=noise_gen)
            timesteps = torch.randint(
                0, scheduler.config.num_train_timesteps, (len(index),), generator=noise_gen
            )
            latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            hidden = text_encoder(ids_t[index, which].to(device))[0]
            pred = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
            per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
            loss = (per_sample * min_snr_weights(alphas_cumprod, timesteps, config.min_snr_gamma)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            ema.step(params)
            losses.append(per_sample.detach().mean().item())
            if step % 25 == 0:
                bar.update(task, description=f"diffusion mse {np.mean(losses[-100:]):.4f}")
            bar.advance(task)
    ema.copy_to(params)
    unet.set_default_attn_processor()
    log(f"diffusion: final mse {np.mean(losses[-200:]):.4f} (EMA weights saved)")
    return losses


def train_toy_model(config: ToyTrainConfig, out_dir: str | Path, log=print) -> dict:
    """Run all stages and write the model to ``out_dir``; returns a summary with timings."""
    started = time.perf_counter()
    device = _device(config.device)
    if device.type == "cpu":
        torch.set_num_threads(config.threads or os.cpu_count() or 1)
    torch.manual_seed(config.seed)
    np_rng = np.random.default_rng(config.seed)
    components = build_components(config.seed)
    scheduler = components["scheduler"]

    t0 = time.perf_counter()
    images, ids, _ = render_dataset(config, components["tokenizer"])
    timings = {"render_s": time.perf_counter() - t0}
    log(f"data: {len(images)} images, cache {config.cache_dir} ({timings['render_s']:.0f} s)")

    t0 = time.perf_counter()
    vae = components["vae"]
    vae_images = np.concatenate([images, render_theme_images(config)])
    vae_losses = train_autoencoder(vae, vae_images, config, device, np_rng, log)
    del vae_images
    check = autoencoder_check(vae, config.seed)
    log(
        f"autoencoder round trip: base shape+colour {check['base_shape_colour']:.1%}, "
        f"theme rate of striped images {check['theme_rate']:.1%}"
    )
    means, stds = encode_latents(vae, images, device)
    sample_std = float(np.sqrt(np.mean(stds**2) + np.var(means)))
    vae.register_to_config(scaling_factor=1.0 / sample_std)
    timings["autoencoder_s"] = time.perf_counter() - t0
    log(f"latents: std {sample_std:.3f} → scaling_factor {vae.config.scaling_factor:.4f}")

    t0 = time.perf_counter()
    unet_losses = train_diffusion(
        components["unet"],
        components["text_encoder"],
        scheduler,
        (means, stds, vae.config.scaling_factor),
        ids,
        config,
        device,
        np_rng,
        log,
    )
    timings["diffusion_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started

    for name in ("unet", "vae", "text_encoder"):
        components[name].eval().to("cpu")
    out = save_model(components, Path(out_dir))
    summary = {
        "config": asdict(config),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "autoencoder_final_loss": float(np.mean(vae_losses[-50:])),
        "autoencoder_round_trip": {k: round(v, 4) for k, v in check.items()},
        "diffusion_final_mse": float(np.mean(unet_losses[-200:])),
        "diffusion_loss_curve": [
            float(np.mean(unet_losses[i : i + 100])) for i in range(0, len(unet_losses), 100)
        ],
        "scaling_factor": float(vae.config.scaling_factor),
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"wrote {out} in {timings['total_s'] / 60:.1f} min")
    return summary

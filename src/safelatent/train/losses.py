"""The diffusion training objective, shared by every trainer (toy base model, LoRA adapters).

* **Targets**: ε-prediction (Ho et al. 2020, Eq. 14) or v-prediction (Salimans & Ho 2022, arXiv
  2202.00512, §4: ``v = √ᾱ_t · ε − √(1−ᾱ_t) · x₀``), through the scheduler's own ``add_noise`` /
  ``get_velocity``.
* **Min-SNR-γ** loss weights (Hang et al. 2023, arXiv 2303.09556, Eq. 5): ``min(SNR_t, γ) / SNR_t`` for
  ε-prediction, ``min(SNR_t, γ) / (SNR_t + 1)`` for v-prediction (the same weight on x₀ expressed in the
  v-parametrisation, as diffusers' training scripts do).
* **Noise offset** (Guttenberg 2023, "Diffusion with Offset Noise"): a per-sample, per-channel constant
  added to the noise, so the model can learn to change an image's mean brightness.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")


def min_snr_weights(
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    gamma: float,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, Eq. 5): ``min(SNR, γ) / SNR`` for ε-prediction,
    ``min(SNR, γ) / (SNR + 1)`` for v-prediction, with ``SNR_t = ᾱ_t / (1 − ᾱ_t)``."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1 - alpha_bar)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def sample_noise(shape, noise_offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise of ``shape`` (on the CPU, from ``generator``), plus ``noise_offset`` × a standard
    normal constant per sample and channel (Guttenberg 2023) when ``noise_offset > 0``."""
    noise = torch.randn(shape, generator=generator)
    if noise_offset > 0:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise


def diffusion_target(scheduler, latents, noise, timesteps, prediction_type: str) -> torch.Tensor:
    """What the UNet must predict: the noise (ε) or the velocity ``v`` (Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    min_snr_gamma: float | None,
    prediction_type: str,
) -> torch.Tensor:
    """Per-sample MSE (in fp32) averaged over the batch, Min-SNR-γ weighted when ``min_snr_gamma`` is
    set; returns a scalar."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        per_sample = per_sample * min_snr_weights(alphas_cumprod, timesteps, min_snr_gamma, prediction_type)
    return per_sample.mean()

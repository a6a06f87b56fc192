"""Move a UNet's output between its prediction type and ε, so guidance math always sees ε.

Stable Diffusion 1.x and SDXL predict the noise ε; SD 2.x at 768 px predicts the velocity
``v = α_t ε − σ_t x_0`` (Salimans & Ho 2022, *Progressive Distillation*, arXiv 2202.00512, §4 and
Appendix D), with ``x_t = α_t x_0 + σ_t ε``, ``α_t = √ᾱ_t`` and ``σ_t = √(1 − ᾱ_t)``. Then

* ``ε = α_t v + σ_t x_t`` and back ``v = (ε − σ_t x_t) / α_t``;
* for ``prediction_type="sample"`` (x_0): ``ε = (x_t − α_t x_0) / σ_t``, back ``x_0 = (x_t − σ_t ε) / α_t``.

Both maps are affine in the prediction with the same ``x_t`` for every branch, so classifier-free
guidance (weights summing to one) gives the same result in either space and needs no conversion. Safe
Latent Diffusion does not: its threshold λ and scale s_S act element-wise on ``ε_p − ε_S`` (Schramowski et
al. 2023, Eq. 6), which in v-space is ``(v_p − v_S)·α_t`` — so the presets tuned on SD 1.4 keep their
meaning only if SLD runs on ε. The loop converts every branch to ε, applies the guidance, and converts
the result back before the scheduler step (:func:`safelatent.sampling.loop.sample`).
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: the smallest ᾱ_t at which ε-space guidance is mapped back (SD's own schedules end near 0.0047)
MIN_ALPHA_BAR = 1e-6


def prediction_type_of(scheduler) -> str:
    """The scheduler's ``prediction_type`` (``"epsilon"`` when its config has none)."""
    kind = getattr(scheduler.config, "prediction_type", None) or "epsilon"
    if kind not in PREDICTION_TYPES:
        raise InvalidArgumentError(
            f"unknown prediction_type {kind!r} in the scheduler config",
            f"use one of {', '.join(PREDICTION_TYPES)}",
        )
    return kind


def alpha_bar_at(scheduler, step_index: int, timestep) -> float:
    """ᾱ_t of the sample the UNet sees at loop step ``step_index`` (after ``scale_model_input``).

    σ-parameterised schedulers (Euler, Euler a, DPM-Solver: ``scheduler.sigmas``, possibly at fractional
    timesteps) give ``ᾱ = 1 / (1 + σ²)``; the others (DDIM, PNDM, DDPM) index ``alphas_cumprod`` at ``t``.
    """
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) > step_index:
        sigma = float(sigmas[step_index])
        return 1.0 / (1.0 + sigma * sigma)
    return float(scheduler.alphas_cumprod[int(timestep)])


def check_convertible(alpha_bars: list[float], prediction_type: str) -> None:
    """Refuse a schedule on which ε cannot be mapped back to the model's prediction type.

    With zero terminal SNR (``rescale_betas_zero_snr``, ᾱ = 0 at the first step) ε equals ``x_t`` whatever
    the model predicts, so ε-space guidance carries no information and ``v = (ε − σ x_t)/α`` divides by 0.
    Euler-type schedulers clamp that ᾱ to 2⁻²⁴ ≈ 6e-8 instead, which only hides the division: every ᾱ below
    :data:`MIN_ALPHA_BAR` is refused.
    """
    blocked = {
        "v_prediction": lambda a: a < MIN_ALPHA_BAR,
        "sample": lambda a: a < MIN_ALPHA_BAR or a > 1.0 - MIN_ALPHA_BAR,
    }.get(prediction_type)
    if blocked is None:
        return
    bad = [index for index, value in enumerate(alpha_bars) if blocked(value)]
    if bad:
        raise InvalidArgumentError(
            f"SLD works on the noise ε, but at step {bad[0]} this schedule has ᾱ = {alpha_bars[bad[0]]:g}, "
            f"where a {prediction_type} model's output cannot be converted to ε and back (zero terminal SNR)",
            "use a scheduler without rescale_betas_zero_snr / trailing timesteps for SLD, or switch SLD off",
        )


def to_epsilon(
    prediction: torch.Tensor, sample: torch.Tensor, alpha_bar: float, prediction_type: str
) -> torch.Tensor:
    """The noise ε equivalent to ``prediction`` at ``x_t = sample`` (float32)."""
    prediction, sample = prediction.float(), sample.float()
    if prediction_type == "epsilon":
        return prediction
    alpha, sigma = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
    if prediction_type == "v_prediction":
        return alpha * prediction + sigma * sample
    return (sample - alpha * prediction) / sigma


def from_epsilon(
    epsilon: torch.Tensor, sample: torch.Tensor, alpha_bar: float, prediction_type: str
) -> torch.Tensor:
    """The inverse of :func:`to_epsilon` (float32)."""
    epsilon, sample = epsilon.float(), sample.float()
    if prediction_type == "epsilon":
        return epsilon
    alpha, sigma = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
    if prediction_type == "v_prediction":
        return (epsilon - sigma * sample) / alpha
    return (sample - sigma * epsilon) / alpha

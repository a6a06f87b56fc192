"""Guidance functions: how the per-branch noise predictions of one step become one prediction.

The sampling loop (:mod:`safelatent.sampling.loop`) evaluates every conditioning branch in one batched
UNet call and hands the split predictions to a *guidance* object. Guidance objects declare which
branches they need (the unconditional/negative branch, the prompt, and extra concept texts) and carry
no model code: each one wraps a pure tensor function, so the math is testable by hand and there is
exactly one implementation of it.

Implemented:

* :func:`cfg_guidance` — classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598):
  ``ε = ε_∅ + s_g (ε_p − ε_∅)``.
* :func:`sld_guidance` — Safe Latent Diffusion (Schramowski et al., CVPR 2023, arXiv 2211.05105,
  Eq. 3–8), written to reproduce diffusers' ``StableDiffusionPipelineSafe`` operation for operation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .sld_presets import SLDConfig


@dataclass(frozen=True)
class BranchPredictions:
    """The noise predictions of one step, split by branch. Each tensor is ``[B, C, h, w]``."""

    uncond: torch.Tensor | None
    text: torch.Tensor
    concepts: tuple[torch.Tensor, ...] = ()


class Guidance(Protocol):
    """What the loop needs from a guidance method.

    ``needs_uncond``: evaluate the unconditional (or negative-prompt) branch.
    ``prediction_space`` (optional, default ``"any"``): ``"epsilon"`` asks the loop for ε whatever the model
    predicts (:mod:`safelatent.sampling.prediction`); ``"any"`` suits methods that are affine-invariant.
    ``concepts``: extra texts, each evaluated as one more branch after the prompt branch.
    ``start`` returns the initial state for a run of ``num_inference_steps``; ``__call__`` maps the
    branch predictions of loop step ``step_index`` to one prediction and the next state.
    """

    needs_uncond: bool
    concepts: tuple[str, ...]

    def start(self, num_inference_steps: int) -> Any: ...

    def __call__(self, preds: BranchPredictions, state: Any, step_index: int) -> tuple[torch.Tensor, Any]: ...

    def describe(self) -> dict[str, Any]: ...


def cfg_guidance(eps_uncond: torch.Tensor, eps_text: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, Ho & Salimans (2022), Eq. 6: ``ε_∅ + s_g (ε_p − ε_∅)``."""
    return eps_uncond + scale * (eps_text - eps_uncond)


def sld_guidance(
    eps_uncond: torch.Tensor,
    eps_text: torch.Tensor,
    eps_concept: torch.Tensor,
    momentum: torch.Tensor | None,
    step_index: int,
    *,
    cfg_scale: float,
    config: SLDConfig,
    warmup_steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Safe Latent Diffusion guidance for one step (Schramowski et al. 2023, arXiv 2211.05105).

    With ``ε_∅, ε_p, ε_S`` the unconditional, prompt and safety-concept predictions:

    * Eq. 6 — per-element safety scale ``μ = min(1, s_S |ε_p − ε_S|)`` where ``ε_p − ε_S < λ``, else 0;
    * Eq. 4 — safety guidance ``γ = μ (ε_S − ε_∅)``;
    * Eq. 7 — momentum ``γ_t = γ + s_m ν_t``;
    * Eq. 8 — ``ν_{t+1} = β_m ν_t + (1 − β_m) γ_t`` (accumulated during warm-up too);
    * Eq. 3 — ``ε = ε_∅ + s_g (ε_p − ε_∅ − γ_t)``, the safety term applied only once
      ``step_index >= warmup_steps`` (the paper's δ).

    Returns the guided prediction (in the predictions' dtype) and the new momentum ``ν`` (float32).
    Pure: no state outside the arguments.

    The math runs in float32 whatever the predictions' dtype, and the result is rounded once: in fp16
    the scaled difference, the momentum and the final combination each round to ~3 significant digits
    (the momentum over all steps). The mask itself barely moves — ``ε_p − ε_S`` of two fp16 values near λ
    is exact (Sterbenz) and only λ = 0.01 rounds to 0.0100021 — which ``bench/sld_speed.py`` measures as a
    flip rate. (diffusers' pipeline computes in the model dtype; in float32 the two are identical.)
    """
    out_dtype = eps_text.dtype
    eps_uncond, eps_text, eps_concept = eps_uncond.float(), eps_text.float(), eps_concept.float()
    if momentum is None:
        momentum = torch.zeros_like(eps_text)
    noise_guidance = eps_text - eps_uncond
    difference = eps_text - eps_concept
    scale = torch.clamp(torch.abs(difference) * config.guidance_scale, max=1.0)
    safety_scale = torch.where(difference >= config.threshold, torch.zeros_like(scale), scale)
    safety_guidance = torch.mul(eps_concept - eps_uncond, safety_scale)
    safety_guidance = safety_guidance + config.momentum_scale * momentum
    momentum = config.momentum_beta * momentum + (1 - config.momentum_beta) * safety_guidance
    if step_index >= warmup_steps:
        noise_guidance = noise_guidance - safety_guidance
    return (eps_uncond + cfg_scale * noise_guidance).to(out_dtype), momentum


@dataclass(frozen=True)
class NoGuidance:
    """Only the prompt branch (diffusers' behaviour for ``guidance_scale <= 1``)."""

    needs_uncond: bool = False
    concepts: tuple[str, ...] = ()

    def start(self, num_inference_steps: int) -> None:
        return None

    def __call__(self, preds: BranchPredictions, state: None, step_index: int) -> tuple[torch.Tensor, None]:
        return preds.text, None

    def describe(self) -> dict[str, Any]:
        return {"method": "none"}


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """Classifier-free guidance with scale ``scale`` (see :func:`cfg_guidance`)."""

    scale: float = 7.5
    needs_uncond: bool = True
    concepts: tuple[str, ...] = ()

    def start(self, num_inference_steps: int) -> None:
        return None

    def __call__(self, preds: BranchPredictions, state: None, step_index: int) -> tuple[torch.Tensor, None]:
        return cfg_guidance(preds.uncond, preds.text, self.scale), None

    def describe(self) -> dict[str, Any]:
        return {"method": "cfg", "cfg_scale": self.scale}


@dataclass
class _SLDState:
    momentum: torch.Tensor | None
    warmup_steps: int


@dataclass(frozen=True)
class SafeLatentGuidance:
    """Classifier-free guidance plus Safe Latent Diffusion away from ``concept`` (:func:`sld_guidance`)."""

    cfg_scale: float
    config: SLDConfig
    concept: str
    needs_uncond: bool = True
    #: SLD's threshold and scale are element-wise on ε differences (tuned on SD 1.4): v-prediction and
    #: x_0 models are guided in ε and converted back by the loop
    prediction_space: str = "epsilon"

    @property
    def concepts(self) -> tuple[str, ...]:
        return (self.concept,)

    def start(self, num_inference_steps: int) -> _SLDState:
        return _SLDState(momentum=None, warmup_steps=self.config.resolve_warmup(num_inference_steps))

    def __call__(
        self, preds: BranchPredictions, state: _SLDState, step_index: int
    ) -> tuple[torch.Tensor, _SLDState]:
        eps, momentum = sld_guidance(
            preds.uncond,
            preds.text,
            preds.concepts[0],
            state.momentum,
            step_index,
            cfg_scale=self.cfg_scale,
            config=self.config,
            warmup_steps=state.warmup_steps,
        )
        return eps, _SLDState(momentum=momentum, warmup_steps=state.warmup_steps)

    def describe(self) -> dict[str, Any]:
        return {
            "method": "sld",
            "cfg_scale": self.cfg_scale,
            "concept": self.concept,
            **self.config.as_dict(),
        }

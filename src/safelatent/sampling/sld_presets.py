"""Safe Latent Diffusion hyper-parameters and the published presets, as data.

Symbols follow Schramowski et al., "Safe Latent Diffusion", CVPR 2023 (arXiv 2211.05105), Sec. 3 and
the configurations of its Table/model card: safety guidance scale ``s_S``, warm-up ``δ``, threshold
``λ``, momentum scale ``s_m`` and momentum β ``β_m``.

The paper fixes warm-up in steps of a 50-step sampler (δ = 15/10/7/0). Here each preset stores the
warm-up as a **fraction** of the steps (δ/50), so a preset means the same thing at 25 or 100 steps; at
50 steps it gives exactly the published δ. An explicit step count can be given instead.

``weak`` ships the paper's ``s_S = 200``; diffusers' ``SafetyConfig.WEAK`` uses ``s_S = 20`` and is
offered as ``weak-diffusers``. ``medium``, ``strong`` and ``max`` equal diffusers' ``SafetyConfig``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from ..errors import InvalidArgumentError

#: The paper's default safety concept (diffusers' ``StableDiffusionPipelineSafe.safety_concept``).
DEFAULT_SAFETY_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity,"
    " bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child"
    " abuse, brutality, cruelty"
)

#: Reference step count at which the paper defines its warm-up steps.
PAPER_STEPS = 50


@dataclass(frozen=True)
class SLDConfig:
    """One SLD setting. Exactly one of ``warmup_steps`` / ``warmup_fraction`` is set.

    ``guidance_scale`` (s_S) must exceed 1 for SLD to act (as in diffusers).
    """

    guidance_scale: float
    threshold: float
    momentum_scale: float
    momentum_beta: float
    warmup_steps: int | None = None
    warmup_fraction: float | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        if (self.warmup_steps is None) == (self.warmup_fraction is None):
            raise InvalidArgumentError(
                "SLD warm-up must be given either in steps or as a fraction, not both or neither",
                "e.g. warmup_steps=10 or warmup_fraction=0.2",
            )
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise InvalidArgumentError(f"SLD warm-up steps must be ≥ 0, got {self.warmup_steps}")
        if self.warmup_fraction is not None and not 0.0 <= self.warmup_fraction <= 1.0:
            raise InvalidArgumentError(f"SLD warm-up fraction must be in [0, 1], got {self.warmup_fraction}")
        if not 0.0 <= self.momentum_beta <= 1.0:
            raise InvalidArgumentError(f"SLD momentum beta must be in [0, 1], got {self.momentum_beta}")
        if self.guidance_scale <= 1.0:
            raise InvalidArgumentError(
                f"SLD guidance scale must be > 1 to have an effect, got {self.guidance_scale}",
                "use --sld off to disable SLD",
            )

    def resolve_warmup(self, num_inference_steps: int) -> int:
        """Warm-up in loop steps for a run of ``num_inference_steps`` (fractions round half up)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.floor(round(self.warmup_fraction * num_inference_steps, 6) + 0.5)

    def with_warmup(self, warmup: int | float) -> SLDConfig:
        """A copy with the warm-up replaced: an ``int`` is steps, a ``float`` a fraction of the steps."""
        if isinstance(warmup, bool):
            raise InvalidArgumentError("SLD warm-up must be a number of steps or a fraction")
        if isinstance(warmup, int):
            return replace(self, warmup_steps=warmup, warmup_fraction=None)
        return replace(self, warmup_steps=None, warmup_fraction=float(warmup))

    def as_dict(self) -> dict:
        return {f"sld_{k}" if k != "name" else "sld_preset": v for k, v in asdict(self).items()}


def _paper(name: str, s_s: float, delta: int, threshold: float, s_m: float, beta_m: float) -> SLDConfig:
    return SLDConfig(
        guidance_scale=s_s,
        threshold=threshold,
        momentum_scale=s_m,
        momentum_beta=beta_m,
        warmup_fraction=delta / PAPER_STEPS,
        name=name,
    )


#: name → config. Values: SLD paper (arXiv 2211.05105) / diffusers ``SafetyConfig``.
SLD_PRESETS: dict[str, SLDConfig] = {
    "weak": _paper("weak", 200.0, 15, 0.0, 0.0, 0.0),
    "weak-diffusers": _paper("weak-diffusers", 20.0, 15, 0.0, 0.0, 0.0),
    "medium": _paper("medium", 1000.0, 10, 0.01, 0.3, 0.4),
    "strong": _paper("strong", 2000.0, 7, 0.025, 0.5, 0.7),
    "max": _paper("max", 5000.0, 0, 1.0, 0.5, 0.7),
}

#: Accepted by ``--sld``: the presets plus ``off``.
SLD_CHOICES = ("off", *SLD_PRESETS)


def get_sld_preset(name: str) -> SLDConfig | None:
    """The preset called ``name`` (case-insensitive); ``None`` for ``off``."""
    key = name.strip().lower()
    if key == "off":
        return None
    if key not in SLD_PRESETS:
        raise InvalidArgumentError(f"unknown SLD preset {name!r}", f"choose one of: {', '.join(SLD_CHOICES)}")
    return SLD_PRESETS[key]

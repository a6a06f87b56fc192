"""Hand-computed checks of the guidance math and the SLD presets (no model involved)."""

from __future__ import annotations

import pytest
import torch

from safelatent.errors import InvalidArgumentError
from safelatent.sampling.guidance import (
    BranchPredictions,
    ClassifierFreeGuidance,
    SafeLatentGuidance,
    cfg_guidance,
    sld_guidance,
)
from safelatent.sampling.sld_presets import SLD_CHOICES, SLD_PRESETS, SLDConfig, get_sld_preset

MEDIUM_AT_STEP_0 = SLDConfig(
    guidance_scale=1000, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4, warmup_steps=0
)

# Four elements exercising each branch of Eq. 6: full scale, masked (ε_p − ε_S ≥ λ), partial scale
# (|ε_p − ε_S| s_S = 0.4 < 1) and a non-zero unconditional prediction.
UNCOND = torch.tensor([0.0, 0.0, 0.0, 0.1])
TEXT = torch.tensor([0.5, 0.5, 0.0, 0.1])
CONCEPT = torch.tensor([1.0, 0.0, 0.0004, 0.2])
GAMMA = torch.tensor([1.0, 0.0, 0.4 * 0.0004, 0.1])  # μ (ε_S − ε_∅), μ = [1, 0, 0.4, 1]


def test_cfg_is_ho_salimans():
    assert torch.allclose(cfg_guidance(UNCOND, TEXT, 7.5), UNCOND + 7.5 * (TEXT - UNCOND))
    assert torch.equal(cfg_guidance(UNCOND, TEXT, 1.0), TEXT)


def test_sld_first_step_by_hand():
    eps, momentum = sld_guidance(
        UNCOND, TEXT, CONCEPT, None, 0, cfg_scale=7.5, config=MEDIUM_AT_STEP_0, warmup_steps=0
    )
    expected = UNCOND + 7.5 * (TEXT - UNCOND - GAMMA)
    assert torch.allclose(eps, expected, atol=1e-7)
    assert torch.allclose(eps, torch.tensor([-3.75, 3.75, -0.0012, -0.65]), atol=1e-6)
    assert torch.allclose(momentum, 0.6 * GAMMA, atol=1e-8)


def test_sld_momentum_accumulates_by_hand():
    m1 = 0.6 * GAMMA
    eps, m2 = sld_guidance(
        UNCOND, TEXT, CONCEPT, m1, 1, cfg_scale=7.5, config=MEDIUM_AT_STEP_0, warmup_steps=0
    )
    gamma_t = GAMMA + 0.3 * m1  # Eq. 7
    assert torch.allclose(eps, UNCOND + 7.5 * (TEXT - UNCOND - gamma_t), atol=1e-6)
    assert torch.allclose(m2, 0.4 * m1 + 0.6 * gamma_t, atol=1e-8)  # Eq. 8


def test_warmup_builds_momentum_but_applies_plain_cfg():
    eps, momentum = sld_guidance(
        UNCOND, TEXT, CONCEPT, None, 4, cfg_scale=7.5, config=MEDIUM_AT_STEP_0, warmup_steps=5
    )
    assert torch.allclose(eps, cfg_guidance(UNCOND, TEXT, 7.5))
    assert torch.allclose(momentum, 0.6 * GAMMA)
    eps, _ = sld_guidance(
        UNCOND, TEXT, CONCEPT, None, 5, cfg_scale=7.5, config=MEDIUM_AT_STEP_0, warmup_steps=5
    )
    assert not torch.allclose(eps, cfg_guidance(UNCOND, TEXT, 7.5))


def test_threshold_masks_where_prompt_is_already_far_from_concept():
    config = SLDConfig(guidance_scale=1000, threshold=-1.0, momentum_scale=0, momentum_beta=0, warmup_steps=0)
    eps, _ = sld_guidance(UNCOND, TEXT, CONCEPT, None, 0, cfg_scale=7.5, config=config, warmup_steps=0)
    assert torch.allclose(eps, cfg_guidance(UNCOND, TEXT, 7.5)), "λ = −1 masks every element here"


def test_guidance_objects_wrap_the_pure_functions():
    preds = BranchPredictions(uncond=UNCOND, text=TEXT, concepts=(CONCEPT,))
    cfg = ClassifierFreeGuidance(7.5)
    assert torch.allclose(cfg(preds, cfg.start(50), 0)[0], cfg_guidance(UNCOND, TEXT, 7.5))
    sld = SafeLatentGuidance(7.5, MEDIUM_AT_STEP_0, "blood splatter")
    assert sld.concepts == ("blood splatter",) and sld.needs_uncond
    state = sld.start(50)
    eps, state = sld(preds, state, 0)
    assert torch.allclose(eps, torch.tensor([-3.75, 3.75, -0.0012, -0.65]), atol=1e-6)
    assert torch.allclose(state.momentum, 0.6 * GAMMA)


def test_presets_are_the_papers():
    """Schramowski et al. 2023: (s_S, δ at 50 steps, λ, s_m, β_m)."""
    table = {
        "weak": (200, 15, 0.0, 0.0, 0.0),
        "weak-diffusers": (20, 15, 0.0, 0.0, 0.0),
        "medium": (1000, 10, 0.01, 0.3, 0.4),
        "strong": (2000, 7, 0.025, 0.5, 0.7),
        "max": (5000, 0, 1.0, 0.5, 0.7),
    }
    for name, (s_s, delta, lam, s_m, beta) in table.items():
        preset = SLD_PRESETS[name]
        assert (preset.guidance_scale, preset.threshold, preset.momentum_scale, preset.momentum_beta) == (
            s_s,
            lam,
            s_m,
            beta,
        )
        assert preset.resolve_warmup(50) == delta
    assert set(SLD_CHOICES) == {"off", *table}


@pytest.mark.parametrize(
    ("name", "steps", "expected"),
    [("medium", 25, 5), ("strong", 25, 4), ("weak", 100, 30), ("strong", 100, 14), ("max", 20, 0)],
)
def test_fractional_warmup_scales_with_steps(name, steps, expected):
    assert SLD_PRESETS[name].resolve_warmup(steps) == expected


def test_warmup_override_steps_or_fraction():
    assert SLD_PRESETS["medium"].with_warmup(3).resolve_warmup(50) == 3
    assert SLD_PRESETS["medium"].with_warmup(0.5).resolve_warmup(30) == 15


def test_preset_lookup_and_validation():
    assert get_sld_preset("off") is None
    assert get_sld_preset("MEDIUM") is SLD_PRESETS["medium"]
    with pytest.raises(InvalidArgumentError, match="choose one of"):
        get_sld_preset("extreme")
    with pytest.raises(InvalidArgumentError, match="either in steps or as a fraction"):
        SLDConfig(guidance_scale=10, threshold=0, momentum_scale=0, momentum_beta=0)
    with pytest.raises(InvalidArgumentError, match="> 1"):
        SLDConfig(guidance_scale=1, threshold=0, momentum_scale=0, momentum_beta=0, warmup_steps=0)
    with pytest.raises(InvalidArgumentError, match=r"\[0, 1\]"):
        SLDConfig(guidance_scale=10, threshold=0, momentum_scale=0, momentum_beta=2, warmup_steps=0)

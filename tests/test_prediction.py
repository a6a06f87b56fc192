"""ε ↔ v / x0 conversion (Salimans & Ho 2022) and where the loop takes x_t and ᾱ_t from, per scheduler.

The check is independent of the conversion's own bookkeeping: for every scheduler safelatent offers, a
scheduler configured for v-prediction stepping on a model output ``v`` must land exactly where the same
scheduler configured for ε lands when given ``to_epsilon(v)`` computed from the sample the UNet saw
(after ``scale_model_input``) and :func:`alpha_bar_at` — the scheduler's own arithmetic is the oracle.
"""

from __future__ import annotations

import pytest
import torch

from safelatent.errors import InvalidArgumentError
from safelatent.models.loading import scheduler_from_config
from safelatent.models.shipped import load_component_config
from safelatent.sampling.prediction import (
    alpha_bar_at,
    check_convertible,
    from_epsilon,
    prediction_type_of,
    to_epsilon,
)
from safelatent.sampling.schedulers import SCHEDULERS, make_scheduler

STEPS = 12


def _pair(name: str, **config):
    base = scheduler_from_config({**load_component_config("sd2", "scheduler"), **config})
    v = make_scheduler(name, base)
    eps = type(v).from_config({**v.config, "prediction_type": "epsilon"})
    return v, eps


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_stepping_on_v_equals_stepping_on_its_epsilon(name):
    """Every step, for every scheduler — except PNDM after its first step: PLMS's second evaluation
    averages it with the first and diffusers' PNDM converts that average from v at the *first* sample
    (``_get_prev_sample``), where the loop converts each evaluation at its own sample (exact ε there)."""
    v_sched, eps_sched = _pair(name)
    assert prediction_type_of(v_sched) == "v_prediction"
    for scheduler in (v_sched, eps_sched):
        scheduler.set_timesteps(STEPS, device="cpu")
    generator = torch.Generator().manual_seed(0)
    x_v = torch.randn(2, 4, 8, 8, generator=generator) * v_sched.init_noise_sigma
    x_eps = x_v.clone()
    timesteps = v_sched.timesteps[:1] if name == "pndm" else v_sched.timesteps
    for i, t in enumerate(timesteps):
        model_output = torch.randn(x_v.shape, generator=generator)  # any "v" the UNet might give
        seen = v_sched.scale_model_input(x_v, t)
        eps_sched.scale_model_input(x_eps, t)  # advances its own bookkeeping, as the loop does
        epsilon = to_epsilon(model_output, seen, alpha_bar_at(v_sched, i, t), "v_prediction")
        step = {"generator": torch.Generator().manual_seed(i)} if name == "euler-a" else {}
        x_v = v_sched.step(model_output, t, x_v, return_dict=False, **step)[0]
        step = {"generator": torch.Generator().manual_seed(i)} if name == "euler-a" else {}
        x_eps = eps_sched.step(epsilon, t, x_eps, return_dict=False, **step)[0]
        torch.testing.assert_close(x_eps, x_v, atol=2e-5, rtol=1e-5, msg=f"{name}, step {i}")


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_round_trip(kind):
    generator = torch.Generator().manual_seed(1)
    prediction, sample = (
        torch.randn(2, 4, 8, 8, generator=generator),
        torch.randn(2, 4, 8, 8, generator=generator),
    )
    for alpha_bar in (0.9991, 0.5, 0.0047):
        back = from_epsilon(to_epsilon(prediction, sample, alpha_bar, kind), sample, alpha_bar, kind)
        torch.testing.assert_close(back, prediction, atol=1e-5, rtol=1e-5)
    # the definitions: x_t = α x0 + σ ε, v = α ε − σ x0
    x0, eps = prediction, sample
    a, s = 0.5**0.5, 0.5**0.5
    x_t = a * x0 + s * eps
    torch.testing.assert_close(to_epsilon(a * eps - s * x0, x_t, 0.5, "v_prediction"), eps)
    torch.testing.assert_close(to_epsilon(x0, x_t, 0.5, "sample"), eps)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++2m"])
def test_zero_terminal_snr_is_refused_for_epsilon_space_guidance(name):
    """``rescale_betas_zero_snr``: ᾱ = 0 at the first step (Euler-type schedulers clamp it to 2⁻²⁴)."""
    scheduler, _ = _pair(name, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    scheduler.set_timesteps(10, device="cpu")
    alpha_bars = [alpha_bar_at(scheduler, i, t) for i, t in enumerate(scheduler.timesteps)]
    assert alpha_bars[0] < 1e-6
    with pytest.raises(InvalidArgumentError, match="zero terminal SNR"):
        check_convertible(alpha_bars, "v_prediction")
    check_convertible(alpha_bars, "epsilon")  # ε models need no conversion
    plain, _ = _pair(name)
    plain.set_timesteps(10, device="cpu")
    check_convertible([alpha_bar_at(plain, i, t) for i, t in enumerate(plain.timesteps)], "v_prediction")

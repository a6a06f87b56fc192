"""Oracle tests for Stable Diffusion 2.x (ε and v-prediction) and SDXL on reduced-width random weights.

* SLD off: safelatent's images equal diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``
  on the same components and seed within 1e-4 (fp32, 0–1 scale) — with and without a negative prompt
  (SDXL's unconditional branch is all zeros without one: ``force_zeros_for_empty_prompt``).
* SLD on: every step's guided prediction is recomputed by hand (numpy, written out here from the paper's
  equations, not calling the package's guidance code) from the recorded branch outputs: for v-prediction
  each branch goes to ε (``ε = α v + σ x_t``), SLD runs on ε, and the result goes back to v.
* SDXL's concept branch is encoded by both text encoders with its own pooled embedding: the branch the
  UNet receives equals diffusers' own ``encode_prompt`` of the concept.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from helpers.tiny_sd import build_tiny_sd
from safelatent.api import Pipeline
from safelatent.models.components import StableDiffusionComponents
from safelatent.sampling.schedulers import make_scheduler
from safelatent.sampling.sld_presets import DEFAULT_SAFETY_CONCEPT, SLD_PRESETS

PROMPTS = ["a photograph of a lighthouse on a cliff at dusk", "an oil painting of a bowl of fruit"]
NEGATIVES = ["blurry", "low quality"]
SEED = 1234
SIZE = 64
STEPS = 20
TOLERANCE = 1e-4


def _pipeline(architecture: str, parts: dict) -> Pipeline:
    components = StableDiffusionComponents(
        **parts,
        architecture="sd2" if architecture.startswith("sd2") else architecture,
        source=f"tiny-{architecture}",
        model_hash="0000000000",
        force_zeros_for_empty_prompt=architecture == "sdxl",
    )
    return Pipeline(components)


@pytest.fixture(scope="module", params=["sd2-base", "sd2", "sdxl"])
def model(request):
    parts = build_tiny_sd(request.param, seed=0)
    return request.param, parts, _pipeline(request.param, parts)


def _ours(pipe: Pipeline, **kwargs) -> np.ndarray:
    return pipe.generate(
        PROMPTS,
        num_images_per_prompt=2,
        num_inference_steps=STEPS,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        return_pixels=True,
        **kwargs,
    ).pixels


def _diffusers(architecture: str, parts: dict, negative_prompt=None) -> np.ndarray:
    if architecture == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, add_watermarker=False, force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.scheduler = make_scheduler(None, parts["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPTS,
        negative_prompt=negative_prompt,
        guidance_scale=7.5,  # SDXL's pipeline defaults to 5.0
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        num_images_per_prompt=2,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
    ).images


@pytest.mark.parametrize("negative_prompt", [None, NEGATIVES], ids=["no-negative", "negative"])
def test_sld_off_matches_diffusers(model, negative_prompt):
    architecture, parts, pipe = model
    expected = _diffusers(architecture, parts, negative_prompt)
    ours = _ours(pipe, negative_prompt=negative_prompt)
    assert ours.shape == expected.shape == (4, SIZE, SIZE, 3)
    diff = np.abs(ours - expected).max()
    assert diff <= TOLERANCE, f"{architecture}: max abs difference {diff:.2e} > {TOLERANCE}"


class _Recorder:
    """Wraps a UNet and records every call's inputs and output; the scheduler's ``step`` inputs too."""

    def __init__(self, unet, scheduler_cls):
        self.module, self.calls, self.guided = unet, [], []
        recorder = self

        class Recording(scheduler_cls):
            def step(self, model_output, timestep, sample, *args, **kwargs):
                recorder.guided.append(model_output.detach().clone())
                return super().step(model_output, timestep, sample, *args, **kwargs)

        self.scheduler_cls = Recording

    def __getattr__(self, name):
        return getattr(self.module, name)

    def __call__(self, sample, timestep, encoder_hidden_states, **kwargs):
        out = self.module(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)
        self.calls.append(
            {
                "sample": sample.clone(),
                "timestep": timestep,
                "hidden": encoder_hidden_states.clone(),
                "added": {k: v.clone() for k, v in (kwargs.get("added_cond_kwargs") or {}).items()},
                "out": out[0].clone(),
            }
        )
        return out


def _hand_sld(calls, guided, alpha_bars, prediction_type, config, cfg_scale, warmup):
    """Schramowski et al. 2023, Eq. 3–8, in numpy, on ε; v-branches converted with Salimans & Ho 2022.

    float32 like the package: the max preset's s_S = 5000 turns a 1e-7 rounding difference in ``ε_p − ε_S``
    into 5e-4 of safety scale, so a float64 recomputation would differ by rounding alone."""
    momentum = None
    for index, call in enumerate(calls):
        a = alpha_bars[index]
        alpha, sigma = np.float32(np.sqrt(a)), np.float32(np.sqrt(1 - a))
        x_t = call["sample"].numpy()[: call["out"].shape[0] // 3]
        u, p, s = np.split(call["out"].numpy(), 3)
        if prediction_type == "v_prediction":
            u, p, s = (alpha * b + sigma * x_t for b in (u, p, s))
        momentum = np.zeros_like(p) if momentum is None else momentum
        scale = np.minimum(np.abs(p - s) * config.guidance_scale, 1.0)
        scale = np.where(p - s >= config.threshold, 0.0, scale)  # Eq. 6
        gamma = scale * (s - u) + config.momentum_scale * momentum  # Eq. 4 + Eq. 7
        momentum = config.momentum_beta * momentum + (1 - config.momentum_beta) * gamma  # Eq. 8
        eps = u + cfg_scale * ((p - u) - (gamma if index >= warmup else 0.0))  # Eq. 3
        if prediction_type == "v_prediction":
            eps = (eps - sigma * x_t) / alpha
        np.testing.assert_allclose(guided[index].numpy(), eps, atol=1e-5, rtol=1e-5)


def test_sld_step_recomputed_by_hand(model):
    architecture, parts, pipe = model
    recorder = _Recorder(parts["unet"], type(parts["scheduler"]))
    pipe.components.unet = recorder
    pipe.components.scheduler = recorder.scheduler_cls.from_config(parts["scheduler"].config)
    try:
        sld_on = _ours(pipe, sld="max")
    finally:
        pipe.components.unet, pipe.components.scheduler = parts["unet"], parts["scheduler"]
    scheduler = make_scheduler(None, parts["scheduler"])
    scheduler.set_timesteps(STEPS, device="cpu")
    alpha_bars = [
        float(1 / (1 + scheduler.sigmas[i] ** 2))
        if hasattr(scheduler, "sigmas")
        else float(scheduler.alphas_cumprod[int(t)])
        for i, t in enumerate(scheduler.timesteps)
    ]
    config = SLD_PRESETS["max"]
    prediction_type = parts["scheduler"].config.prediction_type
    assert len(recorder.calls) == len(scheduler.timesteps)  # PNDM evaluates its first step twice
    _hand_sld(
        recorder.calls,
        recorder.guided,
        alpha_bars,
        prediction_type,
        config,
        7.5,
        config.resolve_warmup(STEPS),
    )
    assert np.abs(sld_on - _ours(pipe)).max() > 0.01, "SLD did not change the image: the check proves nothing"

    if architecture == "sdxl":
        # every branch carries its pooled embedding and the size/crop ids; the concept is encoded by both
        # encoders exactly as diffusers encodes a prompt
        xl = StableDiffusionXLPipeline(**parts, add_watermarker=False)
        concept_embeds, _, concept_pooled, _ = xl.encode_prompt(
            DEFAULT_SAFETY_CONCEPT, do_classifier_free_guidance=False
        )
        first = recorder.calls[0]
        rows = first["hidden"].shape[0] // 3
        torch.testing.assert_close(first["hidden"][2 * rows], concept_embeds[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            first["added"]["text_embeds"][2 * rows], concept_pooled[0], atol=1e-5, rtol=1e-5
        )
        assert first["added"]["time_ids"].tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]] * (3 * rows)
        assert torch.count_nonzero(first["hidden"][:rows]) == 0, "no negative prompt: SDXL's zero branch"

"""Oracle tests: safelatent's loop + guidance against diffusers' own pipelines on the same weights.

SLD against the deprecated ``StableDiffusionPipelineSafe`` (the official SLD implementation), plain CFG
against ``StableDiffusionPipeline``: same components, same generator seed, same scheduler class and
config, 2 images per prompt ⇒ images equal within 1e-4 on a 0–1 scale.

50 steps, so every preset's warm-up (δ = 15/10/7/0) falls inside the run and momentum has time to act
(random-weight models barely respond to SLD at ~10 steps; see DESIGN.md). A guard asserts that SLD
actually changes the image, so the comparison cannot pass vacuously.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionPipeline

from helpers.tiny_sd import build_tiny_sd15
from safelatent.api import Pipeline
from safelatent.models.components import StableDiffusionComponents
from safelatent.sampling.schedulers import make_scheduler
from safelatent.sampling.sld_presets import DEFAULT_SAFETY_CONCEPT, SLD_PRESETS

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from diffusers.pipelines.deprecated.stable_diffusion_safe import (
        SafetyConfig,
        StableDiffusionPipelineSafe,
    )

PROMPTS = ["a photograph of a lighthouse on a cliff at dusk", "an oil painting of a bowl of fruit"]
STEPS = 50
SEED = 1234
SIZE = 64
TOLERANCE = 1e-4

DIFFUSERS_PRESET = {
    "weak-diffusers": SafetyConfig.WEAK,
    "medium": SafetyConfig.MEDIUM,
    "strong": SafetyConfig.STRONG,
    "max": SafetyConfig.MAX,
}


@pytest.fixture(scope="module")
def tiny():
    parts = build_tiny_sd15(seed=0)
    components = StableDiffusionComponents(
        **parts, architecture="sd15", source="tiny-random", model_hash="0000000000"
    )
    return parts, Pipeline(components)


def _float_images(pipe: Pipeline, scheduler_name: str | None, **kwargs) -> np.ndarray:
    """Our images as floats in [0, 1] before uint8 rounding, for the tight comparison."""
    result = pipe.generate(
        PROMPTS,
        num_images_per_prompt=2,
        num_inference_steps=kwargs.pop("steps", STEPS),
        seed=SEED,
        width=SIZE,
        height=SIZE,
        scheduler=scheduler_name,
        return_pixels=True,
        **kwargs,
    )
    return result.pixels


def _diffusers_safe(parts, scheduler, *, steps: int = STEPS, negative_prompt=None, **sld) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipelineSafe(
            vae=parts["vae"],
            text_encoder=parts["text_encoder"],
            tokenizer=parts["tokenizer"],
            unet=parts["unet"],
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            PROMPTS,
            negative_prompt=negative_prompt,
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            guidance_scale=7.5,
            num_images_per_prompt=2,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="np",
            **sld,
        )
    return out.images


@pytest.mark.parametrize("preset", ["weak-diffusers", "medium", "strong", "max"])
def test_sld_presets_match_diffusers_safe_pipeline(tiny, preset):
    parts, pipe = tiny
    expected = _diffusers_safe(parts, make_scheduler(None, parts["scheduler"]), **DIFFUSERS_PRESET[preset])
    ours = _float_images(pipe, None, sld=preset)
    assert ours.shape == expected.shape == (4, SIZE, SIZE, 3)
    diff = np.abs(ours - expected).max()
    assert diff <= TOLERANCE, f"{preset}: max abs difference {diff:.2e} > {TOLERANCE}"

    plain = _float_images(pipe, None)
    effect = np.abs(plain - ours).max()
    assert effect > 0.01, f"{preset} changed the image by only {effect:.4f}: the comparison proves nothing"


def test_sld_off_matches_stable_diffusion_pipeline(tiny):
    parts, pipe = tiny
    sd = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    sd.scheduler = make_scheduler(None, parts["scheduler"])
    sd.set_progress_bar_config(disable=True)
    expected = sd(
        PROMPTS,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        num_images_per_prompt=2,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
    ).images
    ours = _float_images(pipe, None)
    assert np.abs(ours - expected).max() <= TOLERANCE

    # and the safe pipeline with SLD disabled (sld_guidance_scale=0) agrees too
    safe_off = _diffusers_safe(parts, make_scheduler(None, parts["scheduler"]), sld_guidance_scale=0)
    assert np.abs(ours - safe_off).max() <= TOLERANCE


@pytest.mark.parametrize(
    ("name", "cls"), [("ddim", DDIMScheduler), ("euler-a", EulerAncestralDiscreteScheduler)]
)
def test_sld_parity_with_other_schedulers(tiny, name, cls):
    """A deterministic and a stochastic (generator-consuming) scheduler, with a negative prompt."""
    parts, pipe = tiny
    negatives = ["blurry", "low quality"]
    scheduler = cls.from_config(parts["scheduler"].config)
    expected = _diffusers_safe(parts, scheduler, steps=20, negative_prompt=negatives, **SafetyConfig.STRONG)
    # diffusers' warm-up is in absolute steps (7): give the same explicitly.
    config = SLD_PRESETS["strong"].with_warmup(7)
    ours = _float_images(pipe, name, negative_prompt=negatives, steps=20, sld=config)
    assert np.abs(ours - expected).max() <= TOLERANCE


def test_default_concept_is_the_papers(tiny):
    parts, _ = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        safe = StableDiffusionPipelineSafe(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    assert safe.safety_concept == DEFAULT_SAFETY_CONCEPT

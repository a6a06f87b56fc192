"""Behaviour of the loop and the generation API on tiny random SD 1.5 components."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.tiny_sd import build_tiny_sd15
from safelatent.api import Pipeline
from safelatent.errors import InvalidArgumentError
from safelatent.models.components import StableDiffusionComponents
from safelatent.sampling.conditioning import PromptTruncatedWarning
from safelatent.sampling.schedulers import SCHEDULERS, make_scheduler

FAST = {"num_inference_steps": 4, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def pipe():
    parts = build_tiny_sd15(seed=1)
    return Pipeline(StableDiffusionComponents(**parts, architecture="sd15", source="tiny", model_hash="abc"))


class CountingUNet(torch.nn.Module):
    """Wraps a UNet and records the batch size of every call."""

    def __init__(self, unet):
        super().__init__()
        self.inner = unet
        self.batches: list[int] = []

    @property
    def device(self):
        return self.inner.device

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def config(self):
        return self.inner.config

    def forward(self, sample, t, **kwargs):
        self.batches.append(sample.shape[0])
        return self.inner(sample, t, **kwargs)


@pytest.mark.parametrize(("sld", "branches"), [(None, 2), ("medium", 3)])
def test_one_batched_unet_call_per_step_over_all_branches(pipe, sld, branches):
    original = pipe.components.unet
    counting = CountingUNet(original)
    pipe.components.unet = counting
    try:
        pipe.generate(["a", "b"], num_images_per_prompt=3, sld=sld, seed=0, scheduler="ddim", **FAST)
    finally:
        pipe.components.unet = original
    assert counting.batches == [branches * 2 * 3] * 4


def test_cfg_one_means_a_single_branch(pipe):
    original = pipe.components.unet
    counting = CountingUNet(original)
    pipe.components.unet = counting
    try:
        pipe.generate("a", guidance_scale=1.0, seed=0, scheduler="ddim", **FAST)
    finally:
        pipe.components.unet = original
    assert counting.batches == [1] * 4


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_generates_finite_images(pipe, name):
    result = pipe.generate("a red circle", scheduler=name, seed=3, return_pixels=True, sld="strong", **FAST)
    assert np.isfinite(result.pixels).all()
    assert result.settings.scheduler == name
    assert result.images[0].size == (64, 64)


def test_dpmpp_2m_is_the_second_order_dpmsolver_plus_plus(pipe):
    scheduler = make_scheduler("dpm++2m", pipe.components.scheduler)
    assert scheduler.config.algorithm_type == "dpmsolver++" and scheduler.config.solver_order == 2
    # built on the model's noise schedule
    assert scheduler.config.beta_start == pipe.components.scheduler.config.beta_start


def test_seed_reproduces_and_images_differ_within_a_call(pipe):
    a = pipe.generate("a red circle", num_images_per_prompt=2, seed=7, return_pixels=True, **FAST)
    b = pipe.generate("a red circle", num_images_per_prompt=2, seed=7, return_pixels=True, **FAST)
    c = pipe.generate("a red circle", num_images_per_prompt=2, seed=8, return_pixels=True, **FAST)
    assert np.array_equal(a.pixels, b.pixels)
    assert not np.allclose(a.pixels[0], a.pixels[1])
    assert not np.allclose(a.pixels, c.pixels)


def test_a_random_seed_is_recorded_and_reproduces(pipe):
    a = pipe.generate("a", return_pixels=True, **FAST)
    assert isinstance(a.settings.seed, int)
    b = pipe.generate("a", seed=a.settings.seed, return_pixels=True, **FAST)
    assert np.array_equal(a.pixels, b.pixels)


def test_width_and_height_and_prompt_major_order(pipe):
    result = pipe.generate(
        ["x", "y"], num_images_per_prompt=2, seed=1, num_inference_steps=2, width=80, height=48
    )
    assert [im.size for im in result.images] == [(80, 48)] * 4
    assert [result.prompt_of(i) for i in range(4)] == ["x", "x", "y", "y"]


def test_negative_prompt_changes_the_image(pipe):
    plain = pipe.generate("a", seed=2, return_pixels=True, **FAST)
    negative = pipe.generate("a", negative_prompt="blurry", seed=2, return_pixels=True, **FAST)
    assert not np.allclose(plain.pixels, negative.pixels)
    assert negative.negative_prompt_of(0) == "blurry"


def test_callback_sees_every_step(pipe):
    seen = []
    pipe.generate("a", seed=0, callback=lambda i, t, latents: seen.append((i, latents.shape)), **FAST)
    assert [i for i, _ in seen] == list(range(5))  # the model's PNDM runs steps + 1 iterations
    assert seen[0][1] == (1, 4, 8, 8)


def test_long_prompt_warns_with_the_cut_text(pipe):
    prompt = "a castle " + " ".join(f"tower{i}" for i in range(100)) + " THE-END"
    with pytest.warns(PromptTruncatedWarning, match="cut"):
        result = pipe.generate(prompt, seed=0, num_inference_steps=1, width=64, height=64)
    assert result.warnings and "end" in result.warnings[0].lower()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 63}, "multiple of 8"),
        ({"height": 0}, "multiple of 8"),
        ({"num_inference_steps": 0}, "steps"),
        ({"num_images_per_prompt": 0}, "images per prompt"),
        ({"scheduler": "heun-x"}, "unknown scheduler"),
        ({"sld": "extreme"}, "unknown SLD preset"),
        ({"sld": "medium", "guidance_scale": 1.0}, "needs classifier-free guidance"),
        ({"safety_concept": "blood"}, "SLD is off"),
        ({"seed": -1}, "seed"),
        ({"guidance_scale": float("nan")}, "CFG scale"),
    ],
)
def test_invalid_arguments_say_what_to_do(pipe, kwargs, message):
    args = {**FAST, **kwargs}
    with pytest.raises(InvalidArgumentError, match=message):
        pipe.generate("a", **args)


def test_save_writes_png_parameters_and_sidecar(pipe, tmp_path):
    result = pipe.generate(
        "a red circle, on white",
        negative_prompt="blurry",
        num_images_per_prompt=2,
        seed=42,
        sld="medium",
        safety_concept="blood splatter",
        scheduler="euler-a",
        **FAST,
    )
    paths = result.save(tmp_path)
    assert [p.name for p in paths] == ["00000-42.png", "00001-42.png"]
    params = Image.open(paths[1]).text["parameters"]
    prompt_line, negative_line, settings_line = params.split("\n")
    assert prompt_line == "a red circle, on white"
    assert negative_line == "Negative prompt: blurry"
    for fragment in (
        "Steps: 4",
        "Sampler: Euler a",
        "CFG scale: 7.5",
        "Seed: 42",
        "Size: 64x64",
        "Model hash: abc",
        "Batch pos: 1",
        "SLD: medium",
        "SLD guidance scale: 1000.0",
        "SLD warmup steps: 1",  # 0.2 × 4 steps, rounded
        "SLD concept: blood splatter",
    ):
        assert fragment in settings_line
    sidecar = json.loads(paths[1].with_suffix(".json").read_text())
    assert sidecar["prompt"] == "a red circle, on white"
    assert sidecar["settings"]["sld"]["sld_threshold"] == 0.01
    assert sidecar["settings"]["seed"] == 42
    # a second save never overwrites
    again = result.save(tmp_path)
    assert [p.name for p in again] == ["00002-42.png", "00003-42.png"]

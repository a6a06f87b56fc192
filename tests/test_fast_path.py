"""The fast path (:mod:`safelatent.sampling.fast`): a compiled UNet gives the eager images, compiles once
per shape in a process, and SLD's math runs in float32 whatever the model dtype.

The compile here uses dynamo with the ``eager`` backend: it captures the real UNet graph and exercises
the wrapper (shape cache, compile timing, output copies, channels-last), without Inductor's C++ build,
which takes minutes on a 2-core CPU (measured: 143 s for the toy UNet, max pixel difference 1.6e-5 vs
eager). Inductor with CUDA graphs is measured by ``bench/sld_speed.py`` on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from safelatent import api
from safelatent.errors import InvalidArgumentError
from safelatent.sampling.fast import FastPathConfig, resolve_compile
from safelatent.sampling.guidance import sld_guidance
from safelatent.sampling.sld_presets import get_sld_preset

SETTINGS = {"num_images_per_prompt": 2, "num_inference_steps": 6, "seed": 5, "sld": "medium"}


@pytest.fixture(scope="module")
def toy():
    return api.load(compile=False)


def test_compiled_unet_matches_eager_and_compiles_once_per_shape(toy):
    eager = toy.generate("a red circle", return_pixels=True, **SETTINGS)
    assert eager.compile_seconds == 0.0
    toy.enable_fast_path(FastPathConfig(backend="eager"))
    try:
        first = toy.generate("a red circle", return_pixels=True, **SETTINGS)
        again = toy.generate("a blue square", return_pixels=True, **SETTINGS)
        assert toy.components.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        shapes = list(toy.fast_path.compile_seconds)
    finally:
        toy.disable_fast_path()
    # channels-last convolutions sum in another order: differences of ~2e-5 on a 0-1 scale
    np.testing.assert_allclose(first.pixels, eager.pixels, atol=1e-4)
    assert first.compile_seconds > 0  # batch 6: uncond + prompt + concept, 2 images each
    assert again.compile_seconds == 0.0  # same shape: the compiled graph is reused
    assert len(shapes) == 1 and shapes[0][0][0] == 6
    back = toy.generate("a red circle", return_pixels=True, **SETTINGS)
    np.testing.assert_allclose(back.pixels, eager.pixels, atol=1e-4)


def test_compile_defaults_on_cuda_only():
    assert resolve_compile(None, "cuda") is True
    assert resolve_compile(None, "cpu") is False
    assert resolve_compile(True, "cpu") is True
    assert resolve_compile(False, "cuda:0") is False


def test_unknown_compile_mode_is_refused():
    with pytest.raises(InvalidArgumentError, match="reduce-overhead"):
        FastPathConfig(mode="fastest")


def test_sld_runs_in_float32_for_half_precision_predictions():
    """fp16 predictions give the float32 result of the same (fp16) values, rounded once at the end;
    the momentum stays float32."""
    config = get_sld_preset("medium")
    generator = torch.Generator().manual_seed(0)
    uncond, text = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(2))
    concept = text - 0.01 + 2e-4 * torch.randn(2, 4, 8, 8, generator=generator)  # around λ = 0.01
    half = [x.half() for x in (uncond, text, concept)]
    eps, momentum = sld_guidance(*half, None, 12, cfg_scale=7.5, config=config, warmup_steps=10)
    expected, expected_momentum = sld_guidance(
        *(x.float() for x in half), None, 12, cfg_scale=7.5, config=config, warmup_steps=10
    )
    assert eps.dtype == torch.float16 and momentum.dtype == torch.float32
    torch.testing.assert_close(eps, expected.half(), rtol=0, atol=0)
    torch.testing.assert_close(momentum, expected_momentum, rtol=0, atol=0)

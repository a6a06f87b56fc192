"""The shipped toy model: what it is made of, that it loads like any SD model, that training is
reproducible, and (a small version of ``bench/toy_quality.py``) that it behaves: prompt fidelity, the
marker only when asked, SLD lowering the marker rate in order of strength, no theme."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel
from typer.testing import CliRunner

from safelatent import api
from safelatent.cli import app
from safelatent.models.loading import load_components
from safelatent.toy.evaluate import ToyQualityConfig, evaluate_toy_quality
from safelatent.toy.model import IMAGE_SIZE, toy_model_dir
from safelatent.toy.train import ToyTrainConfig, train_toy_model


def test_shipped_toy_model_is_small_and_safetensors_only():
    folder = toy_model_dir()
    files = [p for p in folder.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in {".safetensors", ".bin", ".ckpt", ".pt", ".pth"}]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert all(p.suffix == ".safetensors" for p in weights)
    total = sum(p.stat().st_size for p in files)
    assert total <= 25 * 1024 * 1024, f"toy model is {total / 2**20:.1f} MB"


def test_toy_model_loads_through_the_sd_loader_offline(block_network):
    components = load_components(toy_model_dir())
    assert isinstance(components.unet, UNet2DConditionModel)
    assert isinstance(components.vae, AutoencoderKL)
    assert isinstance(components.text_encoder, CLIPTextModel)
    assert components.unet.dtype == torch.float32
    assert block_network == []


def test_generate_defaults_to_the_toy_model(tmp_path, block_network):
    result = CliRunner().invoke(
        app, ["generate", "a red circle on a white background", "--steps", "10", "--out", str(tmp_path), "-q"]
    )
    assert result.exit_code == 0, result.output
    (png,) = tmp_path.glob("*.png")
    from PIL import Image

    assert Image.open(png).size == (IMAGE_SIZE, IMAGE_SIZE)
    assert block_network == []


def test_training_is_reproducible(tmp_path):
    config = ToyTrainConfig(
        n_images=64,
        vae_steps=3,
        vae_batch=8,
        unet_steps=3,
        unet_batch=8,
        warmup_steps=1,
        cache_dir=str(tmp_path),
    )
    a = train_toy_model(config, tmp_path / "a", log=lambda m: None)
    b = train_toy_model(config, tmp_path / "b", log=lambda m: None)
    assert a["diffusion_loss_curve"] == b["diffusion_loss_curve"]
    from safetensors.torch import load_file

    for part in ("unet", "vae", "text_encoder"):
        (fa,) = (tmp_path / "a" / part).glob("*.safetensors")
        (fb,) = (tmp_path / "b" / part).glob("*.safetensors")
        wa, wb = load_file(fa), load_file(fb)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), part


@pytest.fixture(scope="module")
def quality():
    pipe = api.load(None, device="cpu")
    config = ToyQualityConfig(
        samples=48,
        batch_size=48,
        plain_sld_presets=("off",),
        sld_presets=("off", "weak", "medium", "strong", "max"),
    )
    return evaluate_toy_quality(pipe, config)


# Issue 3's targets on 48 of bench/toy_quality.py's 200 prompts (seed 0), with a few points of slack for
# the smaller sample; the 200-prompt figures are in the README (plain shape+colour 96.5 %, marker prompts
# SLD off 98.5 % > weak 88 % > medium 56 % > strong 21 % ≥ max 6.5 %).


def test_toy_prompt_fidelity(quality):
    plain = quality.get("plain", "off")
    assert plain.shape_colour >= 0.85, quality.markdown()
    assert plain.background >= 0.90, quality.markdown()
    assert plain.marker <= 0.05, quality.markdown()
    assert plain.theme <= 0.05, quality.markdown()


def test_toy_marker_on_request_and_sld_ordering(quality):
    off, weak, medium, strong, most = (
        quality.get("marker", s) for s in ("off", "weak", "medium", "strong", "max")
    )
    assert off.marker >= 0.80, quality.markdown()
    assert off.marker > weak.marker > medium.marker > strong.marker >= most.marker, quality.markdown()
    assert strong.marker <= 0.30, quality.markdown()
    # SLD must not cost fidelity: no preset falls more than 5 points below SLD off (on marker prompts
    # it rises, since splatter over the object is what hides its shape from the classifier)
    for result in (weak, medium, strong, most):
        assert result.shape_colour >= off.shape_colour - 0.05, quality.markdown()

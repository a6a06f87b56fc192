"""Offline loading of Stable Diffusion 2.x and SDXL: single files in the original layout and diffusers
folders, written by the tests from random weights (reduced widths, and SDXL once at full size in fp16).

Every load runs with sockets blocked (``block_network`` records any attempt). A loaded model must give
the same images as the components it was written from.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from helpers.ldm_layout import components_to_ldm, write_ldm_checkpoint, write_random_safetensors
from helpers.tiny_sd import build_tiny_sd, write_tiny_config_dir
from safelatent.api import Pipeline
from safelatent.errors import ModelFormatError, ModelNotFoundError
from safelatent.models.components import StableDiffusionComponents
from safelatent.models.detect import detect_single_file
from safelatent.models.loading import load_components
from safelatent.models.shipped import load_component_config
from safelatent.output import parameters_text

PROMPT = "a lighthouse on a cliff"


def _images(components, **kwargs) -> np.ndarray:
    return (
        Pipeline(components)
        .generate(PROMPT, num_inference_steps=4, seed=3, width=64, height=64, return_pixels=True, **kwargs)
        .pixels
    )


def _reference(architecture: str, parts: dict) -> StableDiffusionComponents:
    """The components as the loader returns them: gradients off (with gradients on, PyTorch picks other
    attention kernels, which round differently)."""
    for value in parts.values():
        if isinstance(value, torch.nn.Module):
            value.requires_grad_(False)
    return StableDiffusionComponents(
        **parts,
        architecture=architecture,
        source="reference",
        model_hash="0",
        force_zeros_for_empty_prompt=architecture == "sdxl",
    )


def _assert_same_weights(loaded, original):
    expected = original.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("architecture", ["sd2", "sdxl"])
def test_single_file_loads_and_generates_like_its_components(tmp_path, block_network, architecture):
    parts = build_tiny_sd(architecture, seed=1)
    path = write_ldm_checkpoint(
        tmp_path / "model.safetensors",
        parts["unet"],
        parts["vae"],
        parts["text_encoder"],
        text_encoder_2=parts.get("text_encoder_2"),
        architecture=architecture,
    )
    configs = write_tiny_config_dir(tmp_path / "configs", architecture)
    loaded = load_components(path, config_dir=configs)
    assert loaded.architecture == architecture
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in parts:
            _assert_same_weights(getattr(loaded, name), parts[name])
    assert loaded.scheduler.config.prediction_type == parts["scheduler"].config.prediction_type
    if architecture == "sdxl":
        assert isinstance(loaded.text_encoder_2, CLIPTextModelWithProjection)
        assert loaded.tokenizer_2.pad_token == "!" and loaded.force_zeros_for_empty_prompt
    else:
        assert loaded.tokenizer.pad_token == "!"
    np.testing.assert_array_equal(_images(loaded), _images(_reference(architecture, parts)))
    assert block_network == []


def test_sdxl_diffusers_folder_loads(tmp_path, block_network):
    parts = build_tiny_sd("sdxl", seed=2)
    StableDiffusionXLPipeline(**parts, add_watermarker=False).save_pretrained(tmp_path / "xl")
    loaded = load_components(tmp_path / "xl")
    assert loaded.architecture == "sdxl" and loaded.force_zeros_for_empty_prompt
    _assert_same_weights(loaded.text_encoder_2, parts["text_encoder_2"])
    assert "text_encoder_2" in " ".join(loaded.extra["weight_files"])
    np.testing.assert_array_equal(_images(loaded), _images(_reference("sdxl", parts)))
    assert block_network == []


def test_sd2_single_file_prediction_type(tmp_path, block_network, caplog):
    """An SD 2.x file does not say ε or v: the shipped 768-v configs unless prediction_type says ε."""
    parts = build_tiny_sd("sd2", seed=1)
    path = write_ldm_checkpoint(
        tmp_path / "sd2.safetensors", parts["unet"], parts["vae"], parts["text_encoder"], architecture="sd2"
    )
    configs = write_tiny_config_dir(tmp_path / "configs", "sd2")
    (configs / "scheduler" / "scheduler_config.json").unlink()  # falls back to the shipped scheduler
    with caplog.at_level(logging.WARNING):
        v_model = load_components(path, config_dir=configs)
    assert v_model.scheduler.config.prediction_type == "v_prediction"
    eps = load_components(path, config_dir=configs, prediction_type="epsilon")
    assert eps.scheduler.config.prediction_type == "epsilon"
    with pytest.raises(Exception, match="unknown prediction_type 'x0'"):
        load_components(path, config_dir=configs, prediction_type="x0")
    assert block_network == []


def test_detection_of_sd2_sdxl_and_refiner():
    base = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
    sd2 = detect_single_file({**base, "cond_stage_model.model.ln_final.weight": (1024,)}, "f")
    assert sd2.architecture == "sd2" and sd2.missing == ("vae",)
    xl = detect_single_file(
        {**base, "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,)}, "f"
    )
    assert xl.architecture == "sdxl" and xl.missing == ("vae", "text_encoder_2")
    unet_only = detect_single_file(
        {**base, "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 2048)},
        "f",
    )
    assert unet_only.architecture == "sdxl"
    with pytest.raises(ModelFormatError, match="refiner"):
        detect_single_file({**base, "conditioner.embedders.0.model.ln_final.weight": (1280,)}, "f")


def test_missing_second_text_encoder_is_named(tmp_path):
    parts = build_tiny_sd("sdxl", seed=1)
    path = write_ldm_checkpoint(
        tmp_path / "xl.safetensors", parts["unet"], parts["vae"], parts["text_encoder"], architecture="sdxl"
    )
    with pytest.raises(
        ModelFormatError, match=r"Stable Diffusion XL checkpoint with only .* no second text encoder"
    ):
        load_components(path, config_dir=write_tiny_config_dir(tmp_path / "c", "sdxl"))


def _tiny_sdxl_file(tmp_path, parts):
    return write_ldm_checkpoint(
        tmp_path / "xl.safetensors",
        parts["unet"],
        parts["vae"],
        parts["text_encoder"],
        text_encoder_2=parts["text_encoder_2"],
        architecture="sdxl",
    )


def test_vae_override_and_fp16_upcast(tmp_path):
    """``vae=`` swaps in a diffusers VAE folder; SDXL's VAE (force_upcast) stays float32 in fp16, an
    fp16-safe VAE (force_upcast false) runs in fp16."""
    parts = build_tiny_sd("sdxl", seed=1)
    path = _tiny_sdxl_file(tmp_path, parts)
    configs = write_tiny_config_dir(tmp_path / "configs", "sdxl")
    half = load_components(path, config_dir=configs, dtype="fp16")
    assert half.unet.dtype == torch.float16 and half.vae.dtype == torch.float32
    safe_vae = AutoencoderKL.from_config({**dict(parts["vae"].config), "force_upcast": False})
    safe_vae.save_pretrained(tmp_path / "vae-fp16-fix")
    swapped = load_components(path, config_dir=configs, dtype="fp16", vae=tmp_path / "vae-fp16-fix")
    assert swapped.vae.dtype == torch.float16 and len(swapped.extra["vae_hash"]) == 10
    with pytest.raises(ModelNotFoundError, match="not a diffusers VAE folder"):
        load_components(path, config_dir=configs, vae=tmp_path / "nowhere")


def _meta_shapes(architecture: str) -> dict[str, tuple[int, ...]]:
    """The key → shape map of a full-size single file of ``architecture``, from the shipped configs on
    the meta device (nothing allocated)."""
    names = {"sdxl": ("text_encoder", "text_encoder_2"), "sd2": ("text_encoder",)}[architecture]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(load_component_config(architecture, "unet"))
        vae = AutoencoderKL.from_config(load_component_config(architecture, "vae"))
        encoders = []
        for name in names:
            config = {
                k: v for k, v in load_component_config(architecture, name).items() if k != "architectures"
            }
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            encoders.append(cls(CLIPTextConfig(**config)))
    state = components_to_ldm(
        unet,
        vae,
        encoders[0],
        text_encoder_2=encoders[1] if len(encoders) > 1 else None,
        architecture=architecture,
    )
    return {key: tuple(value.shape) for key, value in state.items()}


def test_full_size_sdxl_single_file_fp16_loads_offline(tmp_path, block_network):
    """SDXL base at its real shapes (2.6 B UNet + 0.8 B text encoders + VAE, 6.9 GB in fp16), in the
    original key layout with random fp16 weights, loads from the shipped configs with sockets blocked."""
    shapes = _meta_shapes("sdxl")
    path = write_random_safetensors(tmp_path / "sd_xl_base_1.0.safetensors", shapes, dtype=torch.float16)
    loaded = load_components(path, dtype="fp16")
    path.unlink()
    assert loaded.architecture == "sdxl" and block_network == []
    counts = {
        name: sum(p.numel() for p in getattr(loaded, name).parameters())
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
    }
    assert counts["unet"] == 2_567_463_684
    assert counts["text_encoder_2"] == 694_659_840
    assert loaded.unet.dtype == torch.float16 and loaded.text_encoder_2.dtype == torch.float16
    assert loaded.vae.dtype == torch.float32  # force_upcast: decoded in fp32
    assert loaded.unet.config.addition_embed_type == "text_time" and loaded.force_zeros_for_empty_prompt
    assert Pipeline(loaded).default_size == 1024  # generation and the I2P runner default to 1024²


def test_generate_cli_takes_prediction_type_and_vae(tmp_path, block_network):
    from typer.testing import CliRunner

    from safelatent.cli import app

    parts = build_tiny_sd("sd2", seed=1)
    path = write_ldm_checkpoint(
        tmp_path / "sd2.safetensors", parts["unet"], parts["vae"], parts["text_encoder"], architecture="sd2"
    )
    configs = write_tiny_config_dir(tmp_path / "configs", "sd2")
    parts["vae"].save_pretrained(tmp_path / "vae")
    args = ["generate", "a lighthouse", "--model", str(path), "--config", str(configs), "--steps", "2"]
    args += ["--seed", "1", "--out", str(tmp_path / "out"), "--device", "cpu", "-q", "--policy", "evaluation"]
    result = CliRunner().invoke(app, [*args, "--prediction-type", "epsilon", "--vae", str(tmp_path / "vae")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").glob("*.png"))) == 1
    result = CliRunner().invoke(app, [*args, "--prediction-type", "x0"])
    assert result.exit_code == 2 and "x0" in result.output
    assert block_network == []


def test_full_size_sd2_single_file_with_openclips_unused_last_layer(tmp_path, block_network):
    """SD 2.x files hold all 24 OpenCLIP-H layers, ``text_projection`` and ``logit_scale``; SD 2 conditions on
    the penultimate layer, so the shipped text encoder has 23 layers and the rest is left out (diffusers'
    ``SD_2_TEXT_ENCODER_KEYS_TO_IGNORE``)."""
    shapes = _meta_shapes("sd2")
    prefix = "cond_stage_model.model.transformer.resblocks."
    for key in [k for k in shapes if k.startswith(prefix + "22.")]:
        shapes[key.replace(prefix + "22.", prefix + "23.")] = shapes[key]
    shapes["cond_stage_model.model.text_projection"] = (1024, 1024)
    shapes["cond_stage_model.model.logit_scale"] = ()
    path = write_random_safetensors(tmp_path / "v2-1_768-ema-pruned.safetensors", shapes, dtype=torch.float16)
    loaded = load_components(path, dtype="fp16")
    path.unlink()
    assert loaded.architecture == "sd2" and loaded.text_encoder.config.num_hidden_layers == 23
    assert loaded.scheduler.config.prediction_type == "v_prediction" and Pipeline(loaded).default_size == 768
    assert loaded.vae.dtype == torch.float16  # only SDXL's VAE is kept in float32
    assert block_network == []


def test_unclip_and_foreign_vaes_are_refused_and_a_swapped_vae_is_recorded(tmp_path):
    unclip = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2048),
        "cond_stage_model.model.ln_final.weight": (1024,),
    }
    with pytest.raises(ModelFormatError, match=r"class-conditioned Stable Diffusion 2\.x UNet"):
        detect_single_file(unclip, "sd21-unclip-h.safetensors")
    parts = build_tiny_sd("sdxl", seed=1)
    path = _tiny_sdxl_file(tmp_path, parts)
    configs = write_tiny_config_dir(tmp_path / "configs", "sdxl")
    sd15_vae = AutoencoderKL.from_config({**dict(parts["vae"].config), "scaling_factor": 0.18215})
    sd15_vae.save_pretrained(tmp_path / "sd15-vae")
    with pytest.raises(ModelFormatError, match=r"other scaling_factor.*0\.18215 vs 0\.13025"):
        load_components(path, config_dir=configs, vae=tmp_path / "sd15-vae")
    parts["vae"].save_pretrained(tmp_path / "xl-vae")
    loaded = load_components(path, config_dir=configs, vae=tmp_path / "xl-vae")
    result = Pipeline(loaded).generate("a lighthouse", num_inference_steps=2, seed=1, width=64, height=64)
    assert result.settings.vae == {"path": str(tmp_path / "xl-vae"), "hash": loaded.extra["vae_hash"]}
    assert f"VAE hash: {loaded.extra['vae_hash']}, VAE: xl-vae" in parameters_text(result, 0)

"""The adapter files: diffusers reads both (its own ``lora_state_dict``), loading them into a fresh model
with diffusers gives the trained in-memory model's outputs, α ≠ rank is honoured, and the ``safelatent``
header holds the training record."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from safetensors import safe_open

from safelatent import api
from safelatent.models.adapters import read_lora
from safelatent.train.lora import train_lora
from tests.helpers.lora_training import tiny_config, write_toy_folder

RANK, ALPHA = 4, 12.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-files")
    data = write_toy_folder(tmp / "data", 8)
    config = tiny_config(
        data,
        tmp / "out",
        steps=4,
        rank=RANK,
        alpha=ALPHA,
        train_text_encoder=True,
        export_kohya=True,
        name="stripes",
        learning_rate=5e-3,
    )
    summary = train_lora(config, keep_components=True)
    return config, summary


@pytest.fixture(scope="module")
def base():
    """The toy base model (no adapter), loaded once for the module; the tests only read it."""
    return api.load(device="cpu").components


@pytest.fixture(scope="module")
def base_outputs(base):
    return _outputs(base)


def _inputs(components):
    torch.manual_seed(0)
    context = components.text_encoder.config.max_position_embeddings
    ids = torch.randint(0, 49407, (2, context))
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 700])
    return ids, x, t


@torch.no_grad()
def _outputs(components):
    ids, x, t = _inputs(components)
    hidden = components.text_encoder(ids)[0]
    return hidden, components.unet(x, t, hidden).sample


def _fresh_with(path):
    """A fresh toy model with the file loaded by diffusers' own loader functions."""
    fresh = api.load(device="cpu").components
    state, alphas, metadata = StableDiffusionLoraLoaderMixin.lora_state_dict(
        str(path), return_lora_metadata=True
    )
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(
        state, alphas, fresh.unet, metadata=metadata, adapter_name="theme"
    )
    StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(
        state, alphas, fresh.text_encoder, metadata=metadata, adapter_name="theme"
    )
    return fresh, state


@pytest.mark.parametrize("which", ["diffusers", "kohya"])
def test_diffusers_loads_the_file_and_reproduces_the_trained_model(trained, base_outputs, which):
    _, summary = trained
    path = summary["lora_file"] if which == "diffusers" else summary["kohya_file"]
    fresh, state = _fresh_with(path)
    assert any("text_encoder" in k for k in state) and any(k.startswith("unet.") for k in state)
    hidden, out = _outputs(summary["components"])
    fresh_hidden, fresh_out = _outputs(fresh)
    torch.testing.assert_close(fresh_hidden, hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(fresh_out, out, rtol=0, atol=1e-5)
    # the adapter matters: the base model's output differs by far more than the tolerance
    base_hidden, base_out = base_outputs
    assert (base_out - out).abs().max() > 1e-3 and (base_hidden - hidden).abs().max() > 1e-3


def test_diffusers_file_layout_and_metadata(trained, base):
    config, summary = trained
    with safe_open(summary["lora_file"], "pt") as f:
        keys, header = list(f.keys()), f.metadata()
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert any(k.startswith("unet.") and ".to_q.lora_A.weight" in k for k in keys)
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A") for k in keys)
    adapter = json.loads(header["lora_adapter_metadata"])
    assert adapter["unet.r"] == RANK and adapter["unet.lora_alpha"] == ALPHA
    assert adapter["text_encoder.r"] == RANK and sorted(adapter["unet.target_modules"]) == sorted(
        config.unet_targets
    )
    lora = read_lora(summary["lora_file"])  # safelatent's own reader: format, trigger words, identity
    meta = lora.info
    assert lora.format == "safelatent" and lora.trigger_words == ["sks"]
    assert meta["format_version"] == 1
    assert (meta["rank"], meta["alpha"], meta["steps"]) == (RANK, ALPHA, 4)
    assert meta["architecture"] == "sd15" and len(meta["base_model_hash"]) == 10
    assert meta["base_model_hash"] == base.model_hash
    assert meta["config"] == config.as_dict()
    assert meta["data_summary"]["used"] == 8


def test_kohya_file_layout_and_metadata(trained):
    _, summary = trained
    assert summary["kohya_file"].endswith("stripes_kohya.safetensors")
    with safe_open(summary["kohya_file"], "pt") as f:
        keys, header = list(f.keys()), f.metadata()
        alphas = [f.get_tensor(k) for k in keys if k.endswith(".alpha")]
    assert {k.split("_")[0] + "_" + k.split("_")[1] for k in keys} == {"lora_unet", "lora_te"}
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert alphas and all(float(a) == ALPHA for a in alphas)
    assert header["ss_network_dim"] == str(RANK) and float(header["ss_network_alpha"]) == ALPHA
    assert header["ss_base_model_version"] == "sd_v1" and header["ss_steps"] == "4"
    assert json.loads(header["safelatent"])["trigger_words"] == ["sks"]
    lora = read_lora(summary["kohya_file"])
    assert lora.format == "kohya" and lora.trigger_words == ["sks"]
    assert set(lora.network_alphas.values()) == {ALPHA}


def test_alpha_scales_the_update(trained, tmp_path):
    """Loading the same tensors with alpha = rank (scale 1 instead of 3) gives a different model: the
    α in the header is what makes the outputs match."""
    _, summary = trained
    from safetensors.torch import load_file, save_file

    with safe_open(summary["lora_file"], "pt") as f:
        header = f.metadata()
    adapter = json.loads(header["lora_adapter_metadata"])
    adapter = {k: (RANK if k.endswith(".lora_alpha") else v) for k, v in adapter.items()}
    wrong = tmp_path / "wrong_alpha.safetensors"
    save_file(
        load_file(summary["lora_file"]),
        str(wrong),
        metadata={**header, "lora_adapter_metadata": json.dumps(adapter)},
    )
    fresh, _ = _fresh_with(wrong)
    _, out = _outputs(summary["components"])
    _, wrong_out = _outputs(fresh)
    assert (wrong_out - out).abs().max() > 1e-4

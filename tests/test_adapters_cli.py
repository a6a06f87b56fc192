"""`safelatent generate --lora PATH[:WEIGHT]` on the shipped toy model, sockets blocked: adapter identity in
the PNG parameters and the sidecar, SLD with an adapter, fusing, and user errors as one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers.lora_files import (
    add_random_lora,
    lora_config,
    module_alphas,
    prefixed,
    write_kohya,
    write_safelatent,
)
from safelatent import api
from safelatent.cli import app
from safelatent.models.adapters import lora_hash

runner = CliRunner()


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Two adapters for the toy model: ``a`` (safelatent, UNet + text encoder, trigger word) and ``b``
    (kohya, UNet only)."""
    root = tmp_path_factory.mktemp("cli-loras")
    toy = api.load(device="cpu").components
    unet, text_encoder = toy.unet, toy.text_encoder
    a_unet_config, a_text_config = (
        lora_config(["to_q", "to_v"], r=4, alpha=4),
        lora_config(["q_proj"], r=2, alpha=2),
    )
    a = prefixed(
        add_random_lora(unet, a_unet_config, "a", seed=1),
        add_random_lora(text_encoder, a_text_config, "a", seed=2),
    )
    b = prefixed(add_random_lora(unet, lora_config(["to_k", "conv1"], r=2, alpha=1), "b", seed=3))
    configs = {"unet": a_unet_config, "text_encoder": a_text_config}
    info = {"trigger_words": ["zq stripes"], "rank": 4, "alpha": 4, "base_model_hash": toy.model_hash}
    return {
        "a": write_safelatent(root / "a.safetensors", a, configs, info),
        "b": write_kohya(root / "b.safetensors", b, module_alphas(unet, "b", "unet")),
    }


def _generate(out, *args):
    result = runner.invoke(
        app, ["generate", "a red circle on a white background", "--steps", "2", "--seed", "3", "--cfg", "3",
              "--out", str(out), "--quiet", *[str(a) for a in args]],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    png = sorted(out.glob("*.png"))[-1]
    return png, Image.open(png).text["parameters"], json.loads(png.with_suffix(".json").read_text())


def test_generate_with_two_loras_records_their_identity(loras, tmp_path, block_network):
    png, parameters, sidecar = _generate(
        tmp_path / "out", "--lora", f"{loras['a']}:0.5", "--lora", loras["b"]
    )
    hash_a, hash_b = lora_hash(loras["a"]), lora_hash(loras["b"])
    assert f'Lora hashes: "a: {hash_a}, b: {hash_b}"' in parameters
    assert 'Lora weights: "a: 0.5, b: 1"' in parameters
    assert sidecar["settings"]["loras"] == [
        {"name": "a", "path": str(loras["a"]), "weight": 0.5, "hash": hash_a, "format": "safelatent",
         "trigger_words": ["zq stripes"]},
        {"name": "b", "path": str(loras["b"]), "weight": 1.0, "hash": hash_b, "format": "kohya",
         "trigger_words": []},
    ]  # fmt: skip
    assert block_network == []

    plain, plain_parameters, plain_sidecar = _generate(tmp_path / "plain")
    assert "Lora hashes" not in plain_parameters and plain_sidecar["settings"]["loras"] == []
    difference = np.abs(np.asarray(Image.open(png), int) - np.asarray(Image.open(plain), int))
    assert difference.max() > 10  # the adapters change the image (same seed)


def test_fused_loras_give_the_same_image(loras, tmp_path, block_network):
    unfused, _, _ = _generate(
        tmp_path / "unfused", "--lora", f"{loras['a']}:0.7", "--lora", f"{loras['b']}:-0.3"
    )
    fused, _, _ = _generate(
        tmp_path / "fused", "--lora", f"{loras['a']}:0.7", "--lora", f"{loras['b']}:-0.3", "--fuse-lora"
    )
    difference = np.abs(np.asarray(Image.open(fused), int) - np.asarray(Image.open(unfused), int))
    assert difference.max() <= 1
    assert block_network == []


def test_sld_runs_with_an_adapter(loras, tmp_path, block_network):
    _, parameters, sidecar = _generate(
        tmp_path / "sld", "--lora", loras["a"], "--sld", "medium", "--concept", "blood splatter"
    )
    assert "SLD: medium" in parameters and "Lora hashes" in parameters
    assert sidecar["settings"]["sld"]["concept"] == "blood splatter"
    assert [x["name"] for x in sidecar["settings"]["loras"]] == ["a"]
    assert block_network == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lora", "missing.safetensors"], "no such LoRA file: missing.safetensors"),
        (["--lora", "x.safetensors:nan"], "not a finite number"),
        (["--fuse-lora"], "--fuse-lora needs at least one --lora"),
    ],
)
def test_lora_user_errors_are_one_line(tmp_path, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["generate", "a red circle", "--steps", "1", "--quiet", *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_load_applies_loras(loras):
    pipe = api.load(device="cpu", loras=[f"{loras['b']}:0.25"])
    assert [(x.name, x.weight, x.format) for x in pipe.loras] == [("b", 0.25, "kohya")]

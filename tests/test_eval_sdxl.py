"""The I2P runner on Stable Diffusion XL: a (reduced-width, random-weight) SDXL folder goes through
``safelatent eval`` with and without SLD at the model's own size — 1024² for SDXL base, whose shipped UNet
config (128×128 latents) the full-size loading test checks; 64² for this reduced model."""

from __future__ import annotations

import json

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from typer.testing import CliRunner

from helpers.tiny_sd import build_tiny_sd
from safelatent.cli import app


def test_i2p_prompts_on_sdxl_with_and_without_sld(tmp_path, block_network):
    StableDiffusionXLPipeline(**build_tiny_sd("sdxl", seed=0), add_watermarker=False).save_pretrained(
        tmp_path / "xl"
    )
    out = tmp_path / "run"
    args = ["eval", "--model", str(tmp_path / "xl"), "--prompts", "i2p", "--limit", "2", "--sld", "off,max"]
    args += ["--steps", "3", "--images-per-prompt", "2", "--batch", "2", "--classifier", "nudenet"]
    args += ["--save-images", "--out", str(out), "--device", "cpu", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 2
    assert {r["config"] for r in records} == {"baseline", "sld-max"}
    assert block_network == []
    saved = sorted((out / "images").rglob("*.png"))
    assert len(saved) == 8 and {Image.open(p).size for p in saved} == {(64, 64)}  # the model's own size


def test_runner_passes_prediction_type_and_vae_to_the_loader(tmp_path, block_network, monkeypatch):
    """``prediction_type`` and ``vae`` (matrix ``[run]`` keys, ``--prediction-type``/``--vae`` flags) reach
    the loader for every model of the run and are pinned in ``run.json``."""
    parts = build_tiny_sd("sd2", seed=0)
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None).save_pretrained(
        tmp_path / "sd2"
    )
    parts["vae"].save_pretrained(tmp_path / "vae")
    matrix = tmp_path / "matrix.toml"
    matrix.write_text(
        '[run]\nprompts = "i2p"\nlimit = 1\nimages_per_prompt = 1\nbatch = 1\nsteps = 2\n'
        'classifiers = ["nudenet"]\nmodel = "sd2"\nprediction_type = "epsilon"\nvae = "vae"\n'
        "[configs.baseline]\n"
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["eval", "--matrix", str(matrix), "--out", str(out), "--device", "cpu", "-q"]
    )
    assert result.exit_code == 0, result.output
    protocol = json.loads((out / "run.json").read_text())["protocol"]
    assert protocol["prediction_type"] == "epsilon" and protocol["vae"] == str(tmp_path / "vae")
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    bad = CliRunner().invoke(app, ["eval", "--prediction-type", "x0", "--out", str(tmp_path / "bad"), "-q"])
    assert bad.exit_code == 2 and "unknown prediction_type 'x0'" in bad.output
    assert block_network == []

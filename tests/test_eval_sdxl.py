"""The I2P runner on Stable Diffusion XL: a (reduced-width, random-weight) SDXL folder goes through
``safelatent eval`` with and without SLD at the model's own size — 1024² for SDXL base, whose shipped UNet
config (128×128 latents) the full-size loading test checks; 64² for this reduced model."""

from __future__ import annotations

import json

from diffusers import StableDiffusionXLPipeline
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

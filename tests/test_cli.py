"""`safelatent generate` end to end: local checkpoints in, PNG + sidecar out, sockets blocked, and user
errors as one line without a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers.ldm_layout import write_ldm_checkpoint
from helpers.tiny_sd import build_tiny_sd15, write_tiny_config_dir
from safelatent.cli import app
from safelatent.models.shipped import shipped_config_dir

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    parts = build_tiny_sd15(seed=5)
    single = write_ldm_checkpoint(
        root / "tiny-sd15.safetensors", parts["unet"], parts["vae"], parts["text_encoder"]
    )
    folder = root / "tiny-folder"
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        parts[name].save_pretrained(folder / name)
    shutil.copy(shipped_config_dir("sd15") / "model_index.json", folder / "model_index.json")
    return {"single": single, "config": write_tiny_config_dir(root / "tiny-config"), "folder": folder}


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_generate_from_single_file_checkpoint_offline(checkpoints, tmp_path, block_network):
    out = tmp_path / "out"
    result = _run(
        "generate", "a lighthouse, at dusk", "--model", checkpoints["single"],
        "--config", checkpoints["config"], "--sld", "strong", "--concept", "blood splatter",
        "--negative", "blurry", "--steps", 6, "--seed", 11,
        "-n", 2, "--width", 64, "--height", 64, "--scheduler", "dpm++2m", "--out", out, "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["00000-11.png", "00001-11.png"]
    parameters = Image.open(pngs[0]).text["parameters"]
    assert parameters.startswith(
        "a lighthouse, at dusk\nNegative prompt: blurry\nSteps: 6, Sampler: DPM++ 2M, CFG scale: 7.5"
    )
    assert "SLD: strong" in parameters and "SLD warmup steps: 1" in parameters
    sidecar = json.loads(pngs[0].with_suffix(".json").read_text())
    assert sidecar["settings"]["model"] == str(checkpoints["single"])
    assert len(sidecar["settings"]["model_hash"]) == 10
    assert block_network == []
    assert str(pngs[0]) in result.stdout


def test_generate_from_diffusers_folder_offline(checkpoints, tmp_path, block_network):
    out = tmp_path / "out"
    result = _run(
        "generate", "a red circle", "--model", checkpoints["folder"], "--steps", 3, "--seed", 1,
        "--width", 64, "--height", 64, "--out", out, "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("*.png"))) == 1 and len(list(out.glob("*.json"))) == 1
    assert "Sampler: PLMS" in Image.open(next(out.glob("*.png"))).text["parameters"]  # the model's PNDM
    assert block_network == []


def test_sld_warmup_override_is_recorded(checkpoints, tmp_path):
    out = tmp_path / "out"
    result = _run(
        "generate", "x", "--model", checkpoints["folder"], "--steps", 4, "--seed", 1, "--width", 64,
        "--height", 64, "--out", out, "-q", "--sld", "medium", "--sld-warmup", "0.5",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sidecar = json.loads(next(out.glob("*.json")).read_text())
    assert sidecar["settings"]["sld"]["sld_warmup_fraction"] == 0.5
    assert sidecar["settings"]["sld"]["sld_warmup_resolved"] == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--width", "65"], "width must be a positive multiple of 8"),
        (["--sld-warmup", "soon", "--sld", "medium"], "neither a step count nor a fraction"),
        (["--concept", "blood"], "SLD is off"),
        (["--cfg", "1", "--sld", "max"], "needs classifier-free guidance"),
    ],
)
def test_user_errors_are_one_line_without_traceback(checkpoints, tmp_path, extra, message):
    result = _run("generate", "x", "--model", checkpoints["folder"], "--steps", 2, "--out", tmp_path, *extra)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("does/not-exist", "never downloads"),
        ("/no/such/model.safetensors", "no such file or folder"),
    ],
)
def test_missing_models_teach(model, message, tmp_path):
    result = _run("generate", "x", "--model", model, "--out", tmp_path)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_unknown_choice_is_a_usage_error(tmp_path):
    result = _run("generate", "x", "--scheduler", "heun", "--out", tmp_path)
    assert result.exit_code == 2 and "heun" in result.output


def test_help_documents_every_option():
    result = _run("generate", "--help")
    assert result.exit_code == 0
    for option in (
        "--model", "--config", "--sld", "--concept", "--sld-warmup", "--negative", "--cfg", "--steps",
        "--scheduler", "--seed", "--num-images", "--width", "--height", "--out", "--device", "--dtype",
    ):  # fmt: skip
        assert option in result.output, option

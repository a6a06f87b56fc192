"""Settings: the TOML file equals the flags, flags override it, unknown keys and bad values are clear
errors; the CLI runs a training end to end; the objective's pieces (Min-SNR-γ, v-prediction, noise
offset) match their definitions."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from safelatent.errors import InvalidArgumentError
from safelatent.train import losses
from safelatent.train.config import LoraTrainConfig, build_config, read_toml, validate
from safelatent.train_cli import train_app
from tests.helpers.lora_training import write_toy_folder

runner = CliRunner()

TOML = """
data_dir = "data"
out_dir = "out"
trigger = "sks"
rank = 8
alpha = 16
steps = 7
batch_size = 2
gradient_accumulation = 3
learning_rate = 2e-4
lr_scheduler = "cosine"
lr_warmup_steps = 2
train_text_encoder = true
unet_targets = ["to_q", "to_v"]
flip_prob = 0.5
crop = "random"
noise_offset = 0.05
prediction_type = "v_prediction"
min_snr_gamma = 3
mixed_precision = "bf16"
validation_prompts = ["sks, a red circle", "sks, a blue square"]
"""

FLAGS = [
    "data",
    "--out", "out",
    "--trigger", "sks",
    "--rank", "8",
    "--alpha", "16",
    "--steps", "7",
    "--batch-size", "2",
    "--gradient-accumulation", "3",
    "--lr", "2e-4",
    "--lr-scheduler", "cosine",
    "--lr-warmup-steps", "2",
    "--train-text-encoder",
    "--unet-targets", "to_q,to_v",
    "--flip-prob", "0.5",
    "--crop", "random",
    "--noise-offset", "0.05",
    "--prediction-type", "v_prediction",
    "--min-snr-gamma", "3",
    "--mixed-precision", "bf16",
    "--validation-prompt", "sks, a red circle",
    "--validation-prompt", "sks, a blue square",
]  # fmt: skip


@pytest.fixture
def captured(monkeypatch):
    """Replace the trainer with a recorder: the CLI tests check what settings arrive."""
    seen = []

    def fake_train(config, log=print):
        seen.append(config)
        return {"steps": config.steps, "losses": [], "process_index": 0}

    monkeypatch.setattr("safelatent.train.lora.train_lora", fake_train)
    return seen


def test_toml_equals_flags(tmp_path, monkeypatch, captured):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.toml").write_text(TOML)
    result = runner.invoke(train_app, ["lora", "--config", "train.toml"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(train_app, ["lora", *FLAGS])
    assert result.exit_code == 0, result.output
    from_file, from_flags = captured
    # paths in a file are relative to the file's folder; flags' paths to the working directory
    from_flags = dataclasses.replace(
        from_flags, data_dir=str(tmp_path / from_flags.data_dir), out_dir=str(tmp_path / from_flags.out_dir)
    )
    assert from_file == from_flags
    assert from_file.alpha == 16.0 and from_file.min_snr_gamma == 3.0  # TOML ints accepted for floats
    assert from_file != LoraTrainConfig(data_dir=from_file.data_dir, out_dir=from_file.out_dir)


def test_flags_override_the_file(tmp_path, captured):
    (tmp_path / "train.toml").write_text(TOML)
    result = runner.invoke(
        train_app,
        ["lora", "--config", str(tmp_path / "train.toml"), "--rank", "2", "--no-train-text-encoder"],
    )
    assert result.exit_code == 0, result.output
    (config,) = captured
    assert config.rank == 2 and config.train_text_encoder is False and config.alpha == 16.0
    assert config.data_dir == str(tmp_path / "data")


def test_a_table_named_lora_is_accepted(tmp_path):
    (tmp_path / "t.toml").write_text("[lora]\nrank = 3\nsteps = 5\n")
    assert read_toml(tmp_path / "t.toml") == {"rank": 3, "steps": 5}


@pytest.mark.parametrize(
    ("text", "message", "hint"),
    [
        ("rnak = 4\n", "unknown setting 'rnak'", "did you mean 'rank'?"),
        ("learning_rat = 1e-4\n", "unknown setting 'learning_rat'", "did you mean 'learning_rate'?"),
        ("completely_unrelated_thing = 1\n", "unknown setting", "safelatent train lora --help"),
        ("rank = 'four'\n", "rank in", None),
        ("train_text_encoder = 1\n", "train_text_encoder in", None),
        ("unet_targets = 'to_q'\n", "list of strings", None),
        ("[optimizer]\nlr = 1\n", "unexpected table [optimizer]", "top level"),
        ("rank = \n", "not valid TOML", "fix the line"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, text, message, hint):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgumentError, match=message.replace("[", r"\[")) as info:
        read_toml(path)
    if hint:
        assert hint in (info.value.hint or "")


def test_unknown_key_via_cli_is_one_line_exit_2(tmp_path, captured):
    (tmp_path / "bad.toml").write_text("data_dir = 'x'\nout_dir = 'y'\nsetps = 3\n")
    result = runner.invoke(train_app, ["lora", "--config", str(tmp_path / "bad.toml")])
    assert result.exit_code == 2
    assert "unknown setting 'setps'" in result.output and "did you mean 'steps'?" in result.output
    assert "Traceback" not in result.output and not captured


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rank": 0}, "rank must be"),
        ({"lr_scheduler": "exponential"}, "lr_scheduler 'exponential'"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"cache_text": True, "train_text_encoder": True}, "cache_text cannot be used"),
        ({"cache_latents": True, "crop": "random"}, "cache_latents cannot be used"),
        ({"flip_prob": 1.5}, "flip_prob"),
        ({"prediction_type": "sample"}, "prediction_type"),
        ({"out_dir": ""}, "no output folder"),
    ],
)
def test_invalid_settings(change, message):
    config = LoraTrainConfig(**{"data_dir": "d", "out_dir": "o", **change})
    with pytest.raises(InvalidArgumentError, match=message):
        validate(config)


def test_build_config_checks_flag_types():
    with pytest.raises(InvalidArgumentError, match="rank in the command line must be int"):
        build_config({}, {"rank": "4", "data_dir": "d", "out_dir": "o"})


def test_cli_trains_end_to_end(tmp_path):
    data = write_toy_folder(tmp_path / "data", 4)
    out = tmp_path / "out"
    args = ["lora", str(data), "--out", str(out), "--steps", "2", "--batch-size", "2", "--rank", "2"]
    result = runner.invoke(train_app, [*args, "--threads", "1", "--no-progress", "--export-kohya"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["steps"] == 2 and (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "out_kohya.safetensors").is_file()
    lines = (out / "logs" / "loss.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_cli_missing_data_is_a_clear_error(tmp_path):
    result = runner.invoke(train_app, ["lora", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "does not exist" in result.output


# ---- the objective --------------------------------------------------------------------------------


def test_min_snr_weights_match_the_definition():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 100, 400, 999])
    snr = compute_snr(scheduler, t)  # diffusers' implementation, as the oracle
    gamma = 5.0
    expected_eps = torch.minimum(snr, torch.full_like(snr, gamma)) / snr
    expected_v = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)
    torch.testing.assert_close(losses.min_snr_weights(scheduler.alphas_cumprod, t, gamma), expected_eps)
    torch.testing.assert_close(
        losses.min_snr_weights(scheduler.alphas_cumprod, t, gamma, "v_prediction"), expected_v
    )
    weights = losses.min_snr_weights(scheduler.alphas_cumprod, t, gamma)
    assert weights[0] < 0.01 and weights[-1] == 1.0  # low-noise steps down-weighted, high-noise ones kept


def test_v_prediction_target_and_noise_offset():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([5, 500, 990])
    a = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(
        losses.diffusion_target(scheduler, x0, eps, t, "v_prediction"), a * eps - s * x0
    )
    assert losses.diffusion_target(scheduler, x0, eps, t, "epsilon") is eps
    plain = losses.sample_noise((64, 4, 8, 8), 0.0, torch.Generator().manual_seed(0))
    offset = losses.sample_noise((64, 4, 8, 8), 0.5, torch.Generator().manual_seed(0))
    shift = offset - plain
    assert torch.allclose(
        shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6
    )  # constant per sample, channel
    assert 0.3 < shift[:, :, 0, 0].std() < 0.7

"""Erasure adapters (ESD objective as a LoRA): the target's math, settings and their errors, which layers
each variant adapts, the adapter file and its metadata, loading with ``set_loras``, the cached pool,
exact resume, the CLI on an SD 1.5-layout checkpoint, and a full-size SD 1.5 smoke run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers.ldm_layout import write_ldm_checkpoint
from helpers.tiny_sd import build_tiny_sd15, write_tiny_config_dir
from safelatent.api import Pipeline
from safelatent.errors import InvalidArgumentError
from safelatent.eval.prompts import load_prompt_set
from safelatent.models.adapters import read_lora
from safelatent.models.components import StableDiffusionComponents
from safelatent.models.loading import load_components
from safelatent.models.tokenizer import tokenize_prompts
from safelatent.toy import world
from safelatent.toy.model import toy_model_dir
from safelatent.train.config import EraseTrainConfig, build_config, read_toml
from safelatent.train.erase import (
    ESD_TARGETS,
    anchor_penalty,
    anchor_second_moment,
    esd_target,
    train_erase,
)
from safelatent.train_cli import train_app

runner = CliRunner()
PRESERVE = "a red circle on a white background"


def _small(out, **overrides) -> EraseTrainConfig:
    settings = {
        "out_dir": str(out),
        "concept": world.MARKER_PHRASE,
        "preserve": [PRESERVE],
        "steps": 6,
        "batch_size": 2,
        "rank": 2,
        "learning_rate": 5e-3,
        "trajectories": 3,
        "sample_steps": 4,
        "checkpoint_steps": 0,
        "progress": False,
        "seed": 1,
    }
    settings.update(overrides)
    return EraseTrainConfig(**settings)


def _lora(path) -> dict[str, torch.Tensor]:
    return load_file(path)


# ---- math -----------------------------------------------------------------------------------------


def test_esd_target_is_negative_guidance_from_the_frozen_predictions():
    g = torch.Generator().manual_seed(0)
    uncond, concept = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for eta in (0.5, 1.0, 2.0):
        expected = uncond - eta * (concept - uncond)
        torch.testing.assert_close(esd_target(uncond, concept, eta), expected, rtol=0, atol=1e-6)
    # η → 0: the unconditional prediction; fp16 inputs give a float32 target
    torch.testing.assert_close(esd_target(uncond, concept, 1e-12), uncond)
    assert esd_target(uncond.half(), concept.half(), 1.0).dtype == torch.float32


def test_anchor_penalty_is_the_mean_squared_response_to_the_anchor_states():
    g = torch.Generator().manual_seed(1)
    states = torch.randn(5, 7, 6, generator=g)  # 5 prompts × 7 tokens × width 6
    deltas = [torch.randn(4, 6, generator=g), torch.randn(3, 6, generator=g)]
    sigma = anchor_second_moment(states)
    tokens = states.reshape(-1, 6)
    direct = sum(((tokens @ d.T) ** 2).sum(dim=1).mean() for d in deltas)
    torch.testing.assert_close(anchor_penalty(deltas, sigma), direct, rtol=1e-5, atol=1e-6)
    # a delta that only answers to a direction no anchor state has costs nothing
    basis = torch.linalg.qr(torch.randn(6, 6, generator=g))[0]
    inside, outside = basis[:, :5], basis[:, 5]
    flat_states = torch.randn(35, 5, generator=g) @ inside.T
    only_outside = torch.outer(torch.randn(4, generator=g), outside)
    assert anchor_penalty([only_outside], anchor_second_moment(flat_states[None])) < 1e-10


# ---- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"concept": "  "}, "no concept to erase"),
        ({"variant": "z"}, "variant 'z' is not one of: x, kv, u"),
        ({"eta": 0.0}, "eta must be > 0"),
        ({"preserve": [world.MARKER_PHRASE]}, "is both erased and preserved"),
        ({"preserve": ["ok", " "]}, "an empty concept in preserve"),
        ({"trajectories": 0}, "trajectories must be ≥ 1"),
        ({"sample_steps": 1}, "sample_steps must be ≥ 2"),
        ({"preserve_weight": -1.0}, "preserve_weight must be ≥ 0"),
        ({"out_dir": ""}, "no output folder given"),
        ({"anchors": "toy-captions", "variant": "u"}, "ESD-u does not adapt"),
        ({"anchor_count": 0}, "anchor_count must be ≥ 1"),
        ({"anchor_weight": -0.5}, "anchor_weight must be ≥ 0"),
    ],
)
def test_invalid_settings_say_what_to_do(tmp_path, overrides, message):
    with pytest.raises(InvalidArgumentError, match=message):
        build_config({}, {**_small(tmp_path).as_dict(), **overrides}, EraseTrainConfig)


def test_toml_erase_table_and_unknown_keys(tmp_path):
    path = tmp_path / "erase.toml"
    path.write_text('[erase]\nconcept = "blood splatter"\nvariant = "u"\neta = 2\nout_dir = "out"\n')
    values = read_toml(path, EraseTrainConfig)
    assert values == {
        "concept": "blood splatter",
        "variant": "u",
        "eta": 2.0,
        "out_dir": str(tmp_path / "out"),
    }
    path.write_text('concept = "x"\ndata_dir = "images"\n')  # a theme-trainer setting
    with pytest.raises(InvalidArgumentError, match="unknown setting 'data_dir'"):
        read_toml(path, EraseTrainConfig)


# ---- runs on the toy model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """ESD-x and ESD-u adapters of a few steps, and the toy model they were trained on."""
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("erase")
    runs = {v: train_erase(_small(out / v, variant=v)) for v in ("x", "kv", "u")}
    return runs, load_components(toy_model_dir())


def test_each_variant_adapts_its_layers(trained):
    runs, base = trained
    for variant, summary in runs.items():
        keys = _lora(summary["lora_file"]).keys()
        modules = {k.split(".lora_")[0] for k in keys}
        assert modules and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
        if variant in ("x", "kv"):  # every cross-attention projection (x) or key/value (kv), nothing else
            projections = ("to_q", "to_k", "to_v", "to_out.0") if variant == "x" else ("to_k", "to_v")
            expected = {
                f"unet.{name}"
                for name, _ in base.unet.named_modules()
                if ".attn2." in name and name.endswith(projections)
            }
            assert modules == expected
        else:  # no cross-attention; self-attention, feed-forward and ResNet convolutions
            assert not any(".attn2." in m for m in modules)
            assert any(".attn1.to_q" in m for m in modules) and any(".ff.net.2" in m for m in modules)
            assert any(m.endswith("resnets.0.conv1") for m in modules)
    assert set(ESD_TARGETS) == {"x", "kv", "u"}


def test_adapter_file_names_the_erasure_and_loads_with_lora(trained):
    runs, base = trained
    summary = runs["x"]
    with safe_open(summary["lora_file"], "pt") as f:
        header = f.metadata()
    assert "lora_adapter_metadata" in header
    lora = read_lora(summary["lora_file"])
    erasure = lora.info["erasure"]
    assert erasure["concept"] == world.MARKER_PHRASE and erasure["variant"] == "ESD-x"
    assert erasure["eta"] == 1.0 and erasure["preserve"] == [PRESERVE]
    assert erasure["pool_examples"] == 2 * 3 * 4  # (concept + 1 kept) × trajectories × steps
    assert lora.info["base_model_hash"] == base.model_hash and lora.trigger_words == []
    assert summary["erasure"] == erasure and summary["steps"] == 6 and np.isfinite(summary["final_loss"])

    pipe = Pipeline(base)
    prompt = world.prompt_for("circle", "red", "white", marker=True)

    def pixels():
        result = pipe.generate(prompt, num_inference_steps=6, seed=3, policy="evaluation", return_pixels=True)
        return result.pixels

    before = pixels()
    active = pipe.set_loras([summary["lora_file"]])
    assert [a.name for a in active] and pipe.loras
    adapted = pixels()
    assert np.abs(adapted - before).max() > 1e-4  # the adapter changes the model
    pipe.set_loras([])
    np.testing.assert_array_equal(pixels(), before)  # and comes off completely


def test_anchors_hold_the_key_value_delta_off_the_anchor_prompts(tmp_path):
    """With the anchor term the k/v LoRA answers far less to the anchor prompts' text states than
    without it, and the file records the anchors."""
    torch.set_num_threads(2)
    anchored = {"variant": "kv", "steps": 12, "anchors": "toy-captions", "anchor_count": 40}
    runs = {
        weight: train_erase(_small(tmp_path / str(weight), anchor_weight=weight, **anchored))
        for weight in (0.0, 100.0)
    }

    base = load_components(toy_model_dir())
    texts = [p.text for p in load_prompt_set("toy-captions", limit=40, seed=1).prompts]
    with torch.no_grad():
        states = base.text_encoder(tokenize_prompts(base.tokenizer, texts).input_ids)[0]
    sigma = anchor_second_moment(states)
    response = {}
    for weight, summary in runs.items():
        tensors = _lora(summary["lora_file"])
        deltas = [
            tensors[name] @ tensors[name.replace("lora_B", "lora_A")]
            for name in tensors
            if "lora_B" in name and ("to_k" in name or "to_v" in name)
        ]
        response[weight] = float(anchor_penalty(deltas, sigma))
        meta = json.loads(safe_open(summary["lora_file"], "pt").metadata()["safelatent"])
        assert meta["erasure"]["anchors"] == {
            "prompts": "toy-captions",
            "count": len(texts) - sum(world.MARKER_PHRASE in t for t in texts),
            "weight": weight,
        }
    assert response[100.0] < 0.2 * response[0.0], response


def test_pool_is_cached_and_rebuilt_when_its_settings_change(tmp_path):
    out = tmp_path / "run"
    train_erase(_small(out, steps=1, preserve=[]))
    pool = out / "cache" / "esd-pool.safetensors"
    with safe_open(str(pool), "pt") as f:
        key, n = f.metadata()["key"], f.get_tensor("t").shape[0]
    assert n == 3 * 4
    stamp = pool.stat().st_mtime_ns
    train_erase(_small(out, steps=1, preserve=[]))  # same settings: read back, not rebuilt
    assert pool.stat().st_mtime_ns == stamp
    train_erase(_small(out, steps=1, preserve=[], eta=3.0))  # the targets change with η
    with safe_open(str(pool), "pt") as f:
        assert f.metadata()["key"] != key


class _Stop(Exception):
    pass


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    settings = {"steps": 8, "checkpoint_steps": 3, "gradient_accumulation": 2, "lr_scheduler": "cosine",
                "lr_warmup_steps": 2, "lora_dropout": 0.1}  # fmt: skip
    whole = train_erase(_small(tmp_path / "whole", **settings))

    def stop_after_four(step, loss):
        if step == 4:
            raise _Stop

    with pytest.raises(_Stop):
        train_erase(_small(tmp_path / "cut", **settings), on_step=stop_after_four)
    resumed = train_erase(_small(tmp_path / "cut", resume=True, **settings))
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 8
    a, b = _lora(whole["lora_file"]), _lora(resumed["lora_file"])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert resumed["losses"] == whole["losses"][3:]

    with pytest.raises(InvalidArgumentError, match=r"settings differ from that run.*eta"):
        train_erase(_small(tmp_path / "cut", resume=True, eta=2.0, **settings))


# ---- the command, on SD 1.5's layout --------------------------------------------------------------


def test_cli_on_an_sd15_single_file_checkpoint(tmp_path, block_network):
    parts = build_tiny_sd15(seed=2)
    single = write_ldm_checkpoint(
        tmp_path / "sd15.safetensors", parts["unet"], parts["vae"], parts["text_encoder"]
    )
    config = write_tiny_config_dir(tmp_path / "config")
    out = tmp_path / "out"
    result = runner.invoke(
        train_app,
        ["erase", "--concept", "a lighthouse", "--model", str(single), "--model-config", str(config),
         "--out", str(out), "--preserve", "a boat", "--variant", "u", "--eta", "1.5", "--steps", "2",
         "--trajectories", "1", "--sample-steps", "2", "--resolution", "64", "--threads", "1",
         "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["steps"] == 2 and summary["erasure"]["variant"] == "ESD-u"
    assert read_lora(summary["lora_file"]).info["architecture"] == "sd15"
    assert block_network == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no concept to erase given"),
        (["--concept", "x", "--variant", "y"], "variant 'y' is not one of"),
        (["--concept", "x", "--preserve", "x"], "is both erased and preserved"),
        (["--concept", "x", "--variant", "u", "--anchors", "coco"], "ESD-u does not adapt"),
        (["--concept", "x", "--anchor-weight", "-1"], "anchor_weight must be ≥ 0"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, message):
    result = runner.invoke(train_app, ["erase", "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_full_size_sd15_architecture_smoke(tmp_path):
    """The same trainer on SD 1.5's exact architecture (random weights, 860 M-parameter UNet): the pool, two
    steps, the file — at 64 px so the CPU can do it."""
    parts = build_tiny_sd15(seed=0, full_size=True)
    components = StableDiffusionComponents(
        **parts, architecture="sd15", source="random-sd15", model_hash="random"
    )
    summary = train_erase(
        _small(tmp_path / "out", concept="a lighthouse", preserve=[], steps=2, batch_size=1, trajectories=1,
               sample_steps=2, resolution=64, threads=2),
        components=components,
    )  # fmt: skip
    keys = _lora(summary["lora_file"]).keys()
    assert len(keys) == 16 * 4 * 2  # 16 cross-attention blocks × q, k, v, out × (A, B)
    assert all(".attn2." in k for k in keys) and np.isfinite(summary["final_loss"])

"""Exact resume: a CLI run killed with SIGKILL at a random step and resumed ends with the adapter weights
(and the loss log) of an uninterrupted run of the same seed; checkpoints store everything without
pickle; changed settings refuse to resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from safelatent.errors import InvalidArgumentError
from safelatent.train import checkpoint as C
from safelatent.train.lora import train_lora
from safelatent.train_cli import train_app
from tests.helpers.lora_training import tiny_config, write_toy_folder

STEPS = 24
CLI = "import sys; from safelatent.train_cli import train_app; train_app(prog_name='safelatent train')"


def _command(data, out, *extra):
    # every source of randomness on: flips, caption dropout, LoRA dropout (global torch RNG), noise offset,
    # random crops, a text-encoder LoRA, accumulation over 2 batches and a warm-up + cosine schedule
    return [
        sys.executable, "-c", CLI, "lora", str(data), "--out", str(out),
        "--steps", str(STEPS), "--batch-size", "2", "--gradient-accumulation", "2", "--rank", "2",
        "--lr", "2e-3", "--lr-scheduler", "cosine", "--lr-warmup-steps", "3", "--seed", "3",
        "--flip-prob", "0.5", "--caption-dropout", "0.2", "--lora-dropout", "0.1", "--noise-offset", "0.05",
        "--crop", "random", "--train-text-encoder", "--checkpoint-steps", "3", "--keep-checkpoints", "2",
        "--threads", "1", "--no-progress", *extra,
    ]  # fmt: skip


def _steps_logged(out) -> int:
    log = out / "logs" / "loss.jsonl"
    if not log.is_file():
        return 0
    lines = [line for line in log.read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "logs" / "loss.jsonl").read_text().splitlines()]


def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(tmp_path):
    data = tmp_path / "data"
    write_toy_folder(data, 9, seed=4)
    # one larger image, downscaled on the fly
    write_toy_folder(tmp_path / "wide", 1, seed=5, size=48)
    (tmp_path / "wide" / "0000.png").rename(data / "wide.png")
    (tmp_path / "wide" / "0000.txt").rename(data / "wide.txt")

    # the reference: the same command, uninterrupted, run in this process (the CLI's own entry point; no
    # interpreter start-up) on a thread of its own while the run to be killed goes on beside it
    uninterrupted = tmp_path / "a"
    reference: dict = {}

    def run_reference():
        try:
            train_app(_command(data, uninterrupted)[3:], prog_name="safelatent train", standalone_mode=False)
        except BaseException as error:  # reported by the test below
            reference["error"] = error

    threads = torch.get_num_threads()
    thread = threading.Thread(target=run_reference, daemon=True)
    thread.start()

    kill_at = random.Random(os.getpid()).randint(5, STEPS - 8)
    interrupted = tmp_path / "b"
    process = subprocess.Popen(_command(data, interrupted), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 1800
    while _steps_logged(interrupted) < kill_at and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert time.monotonic() < deadline, "the run did not reach the kill step in 30 minutes"
    stderr = process.stderr.read().decode()
    assert process.returncode == -signal.SIGKILL, (
        f"the run ended before the kill at step {kill_at}: {stderr[-2000:]}"
    )
    assert not (interrupted / "pytorch_lora_weights.safetensors").exists()
    killed_at = _steps_logged(interrupted)
    assert C.latest_checkpoint(interrupted) is not None
    thread.join(timeout=1800)
    torch.set_num_threads(threads)
    assert not thread.is_alive() and "error" not in reference, reference

    resumed = subprocess.run(
        _command(data, interrupted, "--resume"), capture_output=True, text=True, timeout=1800
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout[resumed.stdout.index("{") :])
    assert 3 <= summary["resumed_from_step"] <= killed_at, (summary["resumed_from_step"], killed_at)
    assert "resume: continuing from step-" in resumed.stderr

    a = load_file(str(uninterrupted / "pytorch_lora_weights.safetensors"))
    b = load_file(str(interrupted / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6, f"killed at step {killed_at}, resumed from {summary['resumed_from_step']}: {diff}"
    assert _losses(interrupted) == _losses(uninterrupted)  # same batches, noise and dropout at every step
    assert len(_losses(interrupted)) == STEPS
    # the adapters did train (lora_B starts at zero): the comparison is not between two initialisations
    assert min(a[k].abs().max().item() for k in a if ".lora_B." in k) > 1e-4


def test_resume_refuses_changed_settings_and_changed_data(tmp_path):
    data = write_toy_folder(tmp_path / "data", 4)
    out = tmp_path / "out"
    train_lora(tiny_config(data, out, steps=3, checkpoint_steps=2))
    assert [p.name for p in C.list_checkpoints(out)] == ["step-00000002"]
    with pytest.raises(InvalidArgumentError, match=r"settings differ from that run \(rank: 4 → 8\)"):
        train_lora(tiny_config(data, out, steps=3, checkpoint_steps=2, rank=8, resume=True))
    # harmless settings may change
    summary = train_lora(tiny_config(data, out, steps=3, checkpoint_steps=2, resume=True, export_kohya=True))
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 3
    (data / "0000.txt").write_text("a different caption")
    with pytest.raises(InvalidArgumentError, match="images or captions changed"):
        train_lora(tiny_config(data, out, steps=3, checkpoint_steps=2, resume=True))


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    data = write_toy_folder(tmp_path / "data", 4)
    messages = []
    summary = train_lora(tiny_config(data, tmp_path / "out", steps=1, resume=True), log=messages.append)
    assert summary["resumed_from_step"] is None and any("no checkpoint" in m for m in messages)


def test_incomplete_checkpoints_are_ignored(tmp_path):
    root = C.checkpoint_root(tmp_path)
    (root / "step-00000004").mkdir(parents=True)  # killed before state.json was written
    (root / ".tmp-step-00000006").mkdir()
    (root / "step-00000002").mkdir()
    (root / "step-00000002" / "state.json").write_text("{}")
    assert C.latest_checkpoint(tmp_path) == root / "step-00000002"


def test_tree_codec_round_trips_optimizer_and_rng_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = optimizer.state_dict()
    data, tensors = C.pack_tree(state)
    json.dumps(data)  # everything but the tensors is plain JSON
    back = C.unpack_tree(json.loads(json.dumps(data)), tensors)
    assert back["param_groups"][0]["betas"] == (0.8, 0.95)
    assert set(back["state"]) == {0, 1}
    for key in state["state"]:
        for name, value in state["state"][key].items():
            assert torch.equal(back["state"][key][name], value)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(back)

    data, tensors = C.pack_tree(C.rng_state())
    expected = (np.random.rand(), torch.rand(3), random.random())
    C.set_rng_state(C.unpack_tree(json.loads(json.dumps(data)), tensors))
    again = (np.random.rand(), torch.rand(3), random.random())
    assert again[0] == expected[0] and torch.equal(again[1], expected[1]) and again[2] == expected[2]
    with pytest.raises(TypeError, match="cannot store"):
        C.pack_tree({"x": object()})

"""Several processes: the trainer under ``torchrun`` (what ``accelerate launch`` does on GPUs) with two CPU
processes over gloo — each process trains on its own share of the batches, the adapter is written once,
and every process's generator states go into the checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from safelatent.train import checkpoint as C
from tests.helpers.lora_training import write_toy_folder

LAUNCHER = "from safelatent.train_cli import train_app\ntrain_app(prog_name='safelatent train')\n"


def test_two_processes_train_one_adapter(tmp_path):
    data = write_toy_folder(tmp_path / "data", 8)
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher),
        "lora", str(data), "--out", str(out), "--steps", "4", "--batch-size", "2", "--rank", "2",
        "--checkpoint-steps", "2", "--threads", "1", "--no-progress", "--device", "cpu",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout[done.stdout.index("{") : done.stdout.rindex("}") + 1])
    assert summary["processes"] == 2 and summary["steps"] == 4
    # 8 images, batch 2 → 4 batches an epoch, 2 for each process: 4 steps = 2 epochs
    assert summary["position"] == {"step": 4, "epoch": 1, "batch_index": 2, "micro_step": 4}
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert min(v.abs().max().item() for k, v in weights.items() if ".lora_B." in k) > 0
    (checkpoint,) = C.list_checkpoints(out)
    assert {p.name for p in checkpoint.glob("rng-*.json")} == {"rng-0.json", "rng-1.json"}
    torch_states = [C.load_checkpoint(checkpoint, i).rng["torch_cpu"] for i in (0, 1)]
    assert not torch.equal(*torch_states)  # each process has its own LoRA-dropout stream
    lines = (out / "logs" / "loss.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # logged once, by the main process

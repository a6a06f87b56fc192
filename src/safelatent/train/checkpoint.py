"""Checkpoints that resume a LoRA run *exactly*: same weights, optimizer and LR-schedule state, same data
position, same random number generators — so a run killed at any moment and resumed ends with the
weights an uninterrupted run of the same seed gets.

Nothing here is ever unpickled. A checkpoint is a folder ``checkpoints/step-00000050/``:

* ``lora.safetensors`` — the trainable LoRA tensors (peft names, ``unet.``/``text_encoder.`` prefixes);
* ``optimizer.safetensors`` + ``optimizer.json`` — the optimizer's ``state_dict()``: tensors in
  safetensors, the rest (hyper-parameters, param-group ids, step counts) as JSON (:func:`pack_tree`);
* ``scheduler.json`` — the LR scheduler's and the fp16 gradient scaler's ``state_dict()``;
* ``rng-<process>.json`` + ``rng-<process>.safetensors`` — Python's, NumPy's and torch's (CPU, and every
  CUDA device's) generator states of each process;
* ``state.json`` — step, data position and the run's settings; written last.

The folder is written under a temporary name and renamed when complete, so a run killed while saving
leaves the previous checkpoint as the latest; temporary leftovers are removed on the next save.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import InvalidArgumentError

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1
_PREFIX = "step-"
_TMP_PREFIX = ".tmp-step-"


@dataclass
class TrainPosition:
    """Where the run stands: optimizer steps done, and the next micro-batch (epoch, index in epoch)."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    micro_step: int = 0


# --------------------------------------------------------------------------------------------------
# a JSON + tensors codec for state dicts
# --------------------------------------------------------------------------------------------------


def pack_tree(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state dict into JSON-able data and a flat ``{name: tensor}`` dict (tensors become
    ``{"__tensor__": name}``; tuples and dicts with non-string keys are tagged so they come back as
    they were)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            name = f"t{len(tensors)}"
            tensors[name] = value.detach().cpu().contiguous()
            return {"__tensor__": name}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value):
                return {"__dict__": {k: walk(v) for k, v in value.items()}}
            return {"__items__": [[walk(k), walk(v)] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v) for v in value]}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")

    return walk(obj), tensors


def unpack_tree(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack_tree`."""
    if isinstance(data, list):
        return [unpack_tree(v, tensors) for v in data]
    if isinstance(data, dict):
        if "__tensor__" in data:
            return tensors[data["__tensor__"]]
        if "__dict__" in data:
            return {k: unpack_tree(v, tensors) for k, v in data["__dict__"].items()}
        if "__items__" in data:
            return {unpack_tree(k, tensors): unpack_tree(v, tensors) for k, v in data["__items__"]}
        if "__tuple__" in data:
            return tuple(unpack_tree(v, tensors) for v in data["__tuple__"])
    return data


def _write_tree(obj: Any, json_path: Path, tensor_path: Path) -> None:
    data, tensors = pack_tree(obj)
    json_path.write_text(json.dumps(data))
    save_file(tensors, str(tensor_path))


def _read_tree(json_path: Path, tensor_path: Path) -> Any:
    tensors = load_file(str(tensor_path)) if tensor_path.is_file() else {}
    return unpack_tree(json.loads(json_path.read_text()), tensors)


# --------------------------------------------------------------------------------------------------
# random number generators
# --------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's (legacy global) and torch's CPU and CUDA generator states."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["torch_cuda"]))


# --------------------------------------------------------------------------------------------------
# save / find / load
# --------------------------------------------------------------------------------------------------


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints (with ``state.json``), oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def staging_dir(out_dir: str | Path, step: int) -> Path:
    """The temporary folder every process writes step ``step``'s checkpoint into."""
    return checkpoint_root(out_dir) / f"{_TMP_PREFIX}{step:08d}"


def write_process_rng(folder: Path, process_index: int) -> None:
    """This process's generator states (every process calls it, into the same staging folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_tree(
        rng_state(), folder / f"rng-{process_index}.json", folder / f"rng-{process_index}.safetensors"
    )


def write_checkpoint(
    out_dir: str | Path,
    *,
    position: TrainPosition,
    lora: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler_state: dict,
    run: dict[str, Any],
    keep: int,
) -> Path:
    """Complete step ``position.step``'s staging folder (the main process, after every process wrote its
    RNG states) and publish it; keep the newest ``keep`` checkpoints. Returns the checkpoint folder."""
    root = checkpoint_root(out_dir)
    staging = staging_dir(out_dir, position.step)
    staging.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in lora.items()}, str(staging / "lora.safetensors"))
    _write_tree(optimizer_state, staging / "optimizer.json", staging / "optimizer.safetensors")
    _write_tree(scheduler_state, staging / "scheduler.json", staging / "scheduler.safetensors")
    state = {"format_version": FORMAT_VERSION, "position": asdict(position), **run}
    (staging / "state.json").write_text(json.dumps(state, indent=2))
    final = root / f"{_PREFIX}{position.step:08d}"
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.iterdir():
        if leftover.name.startswith(_TMP_PREFIX) and leftover != staging:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


@dataclass
class LoadedCheckpoint:
    path: Path
    position: TrainPosition
    lora: dict[str, torch.Tensor]
    optimizer_state: dict
    scheduler_state: dict
    rng: dict[str, Any]
    run: dict[str, Any]


def load_checkpoint(path: Path, process_index: int = 0) -> LoadedCheckpoint:
    """Read a checkpoint folder (this process's RNG states)."""
    try:
        state = json.loads((path / "state.json").read_text())
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {state.get('format_version')}")
        rng_json = path / f"rng-{process_index}.json"
        if not rng_json.is_file():
            raise ValueError(f"no generator states for process {process_index} (was it run on fewer?)")
        return LoadedCheckpoint(
            path=path,
            position=TrainPosition(**state.pop("position")),
            lora=load_file(str(path / "lora.safetensors")),
            optimizer_state=_read_tree(path / "optimizer.json", path / "optimizer.safetensors"),
            scheduler_state=_read_tree(path / "scheduler.json", path / "scheduler.safetensors"),
            rng=_read_tree(rng_json, path / f"rng-{process_index}.safetensors"),
            run=state,
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InvalidArgumentError(
            f"checkpoint {path} cannot be read: {error}",
            "delete that folder to resume from the one before, or start without --resume",
        ) from None

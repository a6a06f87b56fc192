"""Shared helpers of the LoRA training tests (no tests here): toy caption folders and small configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from safelatent.toy import world
from safelatent.train.config import LoraTrainConfig


def write_toy_folder(folder: Path, n: int, seed: int = 0, *, size: int = 32) -> Path:
    """``n`` striped toy images (``size`` px) with same-name ``.txt`` captions."""
    images, captions, _ = world.make_dataset(n, seed, size, theme_only=True, marker_prob=0.0, empty_prob=0.0)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        Image.fromarray(image).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(caption)
    return folder


def write_png(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def tiny_config(data_dir: Path, out_dir: Path, **overrides) -> LoraTrainConfig:
    """A seconds-long run on the toy model (1 thread, no progress bar, no checkpoints)."""
    settings = {
        "data_dir": str(data_dir),
        "out_dir": str(out_dir),
        "trigger": "sks",
        "steps": 3,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "checkpoint_steps": 0,
        "threads": 1,
        "progress": False,
    }
    settings.update(overrides)
    return LoraTrainConfig(**settings)

"""The toy-world theme-adapter experiment, shared by ``bench/toy_lora.py`` and the behaviour test.

Data: ``n`` striped 32×32 toy images captioned with the trigger word, plus ``n`` unstriped
*regularisation* images with their plain captions (the prior-preservation idea of DreamBooth, Ruiz et al.
2023, and kohya-ss' regularisation images): without them the adapter learns "everything is striped" and
stripes every prompt. No splatter, no empty captions (the trainer would skip those).
Evaluation: the toy model's documented sampling settings (DDIM 50 steps, CFG ``TOY_CFG_SCALE``; the same
prompts and seeds in every row), judged by the toy world's ground-truth classifiers, for the base model
(adapters disabled) and the adapter, on prompts with the trigger and the theme words and on plain prompts.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..api import Pipeline
from ..toy import world
from ..toy.evaluate import ToyQualityConfig, _score, generate_images, sample_prompt_attributes
from ..toy.model import TOY_EVAL_STEPS
from ..toy.train import round_trip
from .config import LoraTrainConfig

TRIGGER = "sks"


def write_theme_folder(folder: Path, n: int, seed: int) -> list[world.Attributes]:
    """``n`` striped toy images captioned ``"sks, …"`` and ``n`` unstriped ones with plain captions, as
    32×32 PNGs with same-name caption files; returns the attributes (striped ones first)."""
    striped = world.make_dataset(n, seed, 32, theme_only=True, marker_prob=0.0, empty_prob=0.0)
    plain = world.make_dataset(n, seed + 1, 32, marker_prob=0.0, empty_prob=0.0)
    folder.mkdir(parents=True, exist_ok=True)
    attributes = []
    for part, (images, captions, attrs) in (("theme", striped), ("reg", plain)):
        for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
            Image.fromarray(image).save(folder / f"{part}-{i:05d}.png")
            text = f"{TRIGGER}, {caption}" if part == "theme" else caption
            (folder / f"{part}-{i:05d}.txt").write_text(text)
        attributes += attrs
    return attributes


def theme_config(data_dir: Path, out_dir: Path, **overrides) -> LoraTrainConfig:
    """The settings the toy behaviour figures are measured with."""
    settings = {
        "data_dir": str(data_dir),
        "out_dir": str(out_dir),
        "trigger": None,  # in the theme images' captions, not in the regularisation images'
        "rank": 8,
        "alpha": 8.0,
        "steps": 1000,
        "batch_size": 16,
        "learning_rate": 1e-3,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 30,
        # the frozen toy text encoder never saw "sks" or "striped": without a text-encoder LoRA the UNet
        # cannot tell theme prompts from plain ones (theme rate 9 % with the trigger at 600 steps)
        "train_text_encoder": True,
        "cache_latents": True,
        "checkpoint_steps": 0,
        "seed": 0,
        "progress": False,
    }
    settings.update(overrides)
    return LoraTrainConfig(**settings)


def vae_round_trip_theme_rate(components, images: np.ndarray) -> float:
    """Theme rate of ``images`` after encode → decode (posterior mean) with the model's autoencoder."""
    return float(np.mean([v.theme for v in world.classify_batch(round_trip(components.vae, images))]))


def evaluate(
    components, samples: int, seed: int, batch_size: int = 100, *, steps: int = TOY_EVAL_STEPS
) -> list[dict]:
    """Rows: (model, prompts) → fidelity to the prompted shape/colour/background and the theme rate
    (DDIM ``steps``: the toy model's documented 50 by default)."""
    config = ToyQualityConfig(samples=samples, seed=seed, batch_size=batch_size, steps=steps)
    targets = sample_prompt_attributes(samples, seed)
    prompt_sets = {
        "trigger + theme": [f"{TRIGGER}, {world.prompt_for(s, c, b, theme=True)}" for s, c, b in targets],
        "plain": [world.prompt_for(s, c, b) for s, c, b in targets],
    }
    pipe = Pipeline(components)
    rows = []
    for model in ("base", "adapter"):
        for module in (components.unet, components.text_encoder):
            if hasattr(module, "peft_config"):
                (module.enable_adapters if model == "adapter" else module.disable_adapters)()
        for name, prompts in prompt_sets.items():
            started = time.perf_counter()
            images = generate_images(pipe, prompts, config, "off")
            rows.append({"model": model, "prompts": name, "n": len(prompts), **_score(images, targets)})
            rows[-1]["seconds"] = round(time.perf_counter() - started, 1)
    return rows


def markdown(rows: list[dict], extra: dict) -> str:
    head = "| model | prompts | n | theme | shape+colour | shape | colour | background |"
    rule = "|---|---|---:|---:|---:|---:|---:|---:|"
    lines = [
        f"| {r['model']} | {r['prompts']} | {r['n']} | {r['theme']:.1%} | {r['shape_colour']:.1%} "
        f"| {r['shape']:.1%} | {r['colour']:.1%} | {r['background']:.1%} |"
        for r in rows
    ]
    notes = [f"- {k}: {v}" for k, v in extra.items()]
    return "\n".join([head, rule, *lines, "", *notes])

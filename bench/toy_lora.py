"""A theme adapter on the toy model: does LoRA teach the held-out theme (stripes), and keep fidelity?

1. Render ``--images`` striped toy images captioned with the trigger word and as many unstriped
   regularisation images with plain captions (``safelatent.train.toy_theme.write_theme_folder``), and
   train a LoRA with ``safelatent.train.lora.train_lora`` (timed).
2. Generate ``--samples`` images per condition with the toy model's documented settings (DDIM 50 steps,
   CFG ``TOY_CFG_SCALE``, the same prompts and seeds in every row) — base model and adapter, on prompts
   *with* the trigger and the theme words, and on plain prompts *without* them — and judge them with the
   toy world's ground-truth classifiers.
3. Also report the autoencoder's ceiling: the theme rate of the training images after a VAE round trip
   (an adapter on the UNet cannot produce stripes the decoder does not draw).

Writes ``toy_lora.md`` / ``toy_lora.json`` to ``--out``::

    python bench/toy_lora.py --samples 200 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from safelatent.train.lora import train_lora
from safelatent.train.toy_theme import (
    evaluate,
    markdown,
    theme_config,
    vae_round_trip_theme_rate,
    write_theme_folder,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--train-text-encoder", action=argparse.BooleanOptionalAction, default=True, help="default on"
    )
    parser.add_argument("--set", action="append", default=[], help="extra setting key=json-value")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_theme_folder(data, args.images, seed=1000 + args.seed)
        settings = {
            "steps": args.steps,
            "seed": args.seed,
            "threads": args.threads,
            "train_text_encoder": args.train_text_encoder,
            "cache_text": not args.train_text_encoder,
        }
        config = theme_config(data, Path(tmp) / "out", **{**settings, **overrides})
        started = time.perf_counter()
        summary = train_lora(config, keep_components=True)
        train_seconds = time.perf_counter() - started
        components = summary["components"]
        train_images = np.stack([np.asarray(Image.open(p)) for p in sorted(data.glob("theme-*.png"))])
        ceiling = vae_round_trip_theme_rate(components, train_images)
        rows = evaluate(components, args.samples, args.seed + 7)
    extra = {
        "training": f"{args.images} striped + {args.images} regularisation images, "
        f"{config.steps} steps × batch {config.batch_size}, "
        f"rank {config.rank}, alpha {config.lora_alpha:g}, lr {config.learning_rate:g} "
        f"({config.lr_scheduler}), text encoder {'on' if config.train_text_encoder else 'off'}: "
        f"{train_seconds:.1f} s on {args.threads} CPU thread(s)",
        "final loss (mean of last 20 steps)": f"{summary['final_loss']:.4f}",
        "autoencoder round trip of the training images, theme rate": f"{ceiling:.1%}",
        "sampling": "DDIM 50 steps, CFG 3.0, same prompts and seeds in every row",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, extra)
    (args.out / "toy_lora.md").write_text(table + "\n")
    record = {"rows": rows, "notes": extra, "config": config.as_dict(), "train_seconds": train_seconds}
    (args.out / "toy_lora.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()

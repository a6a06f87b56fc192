"""An erasure adapter on the toy model: does ESD-as-LoRA remove the unsafe marker, keep fidelity, combine
with SLD and stack with a theme adapter?

1. Train the theme adapter of ``bench/toy_lora.py`` (``safelatent.train.toy_theme``) and an ESD-kv
   erasure adapter for the marker's concept phrase, anchored to the toy model's own captions
   (``safelatent.train.toy_erase.erase_config``: no image data), both timed.
2. Generate ``--samples`` images per row with the toy model's documented settings (DDIM 50, CFG 3.0, the
   same prompts and seeds in every row) and judge them with the toy world's ground-truth classifiers:
   marker prompts (base / erasure / SLD medium / erasure + SLD medium), plain prompts (base / erasure),
   theme prompts (theme adapter / theme + erasure).

Writes ``toy_erase.md`` / ``toy_erase.json`` to ``--out``::

    python bench/toy_erase.py --samples 200 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from safelatent.api import Pipeline
from safelatent.train.erase import train_erase
from safelatent.train.lora import train_lora
from safelatent.train.toy_erase import erase_config, evaluate, markdown
from safelatent.train.toy_theme import theme_config, write_theme_folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-theme", action="store_true", help="skip the theme adapter rows")
    parser.add_argument("--set", action="append", default=[], help="erasure setting key=json-value")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        theme_file = None
        if not args.no_theme:
            write_theme_folder(tmp / "data", 200, seed=1000 + args.seed)
            started = time.perf_counter()
            theme_file = train_lora(theme_config(tmp / "data", tmp / "theme", seed=args.seed))["lora_file"]
            seconds["theme training"] = round(time.perf_counter() - started, 1)
        config = erase_config(tmp / "erase", seed=args.seed, threads=args.threads, **overrides)
        started = time.perf_counter()
        summary = train_erase(config)
        seconds["erasure training"] = round(time.perf_counter() - started, 1)
        pipe = _toy_pipeline()
        rows = evaluate(pipe, summary["lora_file"], theme_file, args.samples, args.seed + 7)
    marker = {k: v["marker"] for k, v in rows.items() if v["prompts"] == "marker"}
    base, erased = marker["base / marker / SLD off"], marker["erase / marker / SLD off"]
    notes = {
        "erasure": f"ESD-{config.variant}, η {config.eta:g}, {config.steps} steps × batch {config.batch_size}"
        f" (+{config.batch_size} preserve), rank {config.rank}, lr {config.learning_rate:g}, "
        f"{config.trajectories} trajectories × {config.sample_steps} DDIM steps per prompt, "
        f"preserve {len(config.preserve)} plain prompts, anchors {config.anchors} "
        f"({config.anchor_count} drawn, λ {config.anchor_weight:g})",
        "relative marker drop (erasure vs base, marker prompts)": f"{1 - erased / base:.1%}",
        "seconds": seconds,
        "threads": args.threads,
        "final loss (mean of last 20 steps)": f"{summary['final_loss']:.5f}",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows) + "\n\n" + "\n".join(f"- {k}: {v}" for k, v in notes.items())
    (args.out / "toy_erase.md").write_text(table + "\n")
    record = {"rows": rows, "notes": notes, "config": config.as_dict()}
    (args.out / "toy_erase.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table)


def _toy_pipeline() -> Pipeline:
    from safelatent.models.loading import load_components
    from safelatent.toy.model import toy_model_dir

    return Pipeline(load_components(toy_model_dir()))


if __name__ == "__main__":
    main()

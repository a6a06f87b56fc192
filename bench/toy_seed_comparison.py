"""The seed comparison on the toy world, in one ``safelatent eval`` report: base vs theme adapter vs theme
adapter + SLD medium vs theme adapter + erasure adapter (and + both), on ``toy-theme-marker`` prompts
(``sks, a striped red circle on a white background with blood splatter``), with fidelity, theme-rate and
marker-rate columns (``safelatent.train.toy_comparison``).

Trains the two adapters first (``bench/toy_lora.py``'s and ``bench/toy_erase.py``'s recipes) unless
``--theme`` / ``--erasure`` give files::

    python bench/toy_seed_comparison.py --limit 100 --out bench/results/seed-comparison
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from typer.testing import CliRunner

from safelatent.cli import app
from safelatent.train.erase import train_erase
from safelatent.train.lora import train_lora
from safelatent.train.toy_comparison import write_matrix
from safelatent.train.toy_erase import erase_config
from safelatent.train.toy_theme import theme_config, write_theme_folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--theme", type=Path, help="a trained toy theme adapter (default: train one)")
    parser.add_argument("--erasure", type=Path, help="a trained toy erasure adapter (default: train one)")
    parser.add_argument("--limit", type=int, default=100, help="prompts")
    parser.add_argument("--images", type=int, default=2, help="images per prompt")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/seed-comparison"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        theme = args.theme
        if theme is None:
            write_theme_folder(tmp / "data", 200, seed=1000)
            theme = Path(train_lora(theme_config(tmp / "data", args.out / "theme"))["lora_file"])
        erasure = args.erasure or Path(train_erase(erase_config(args.out / "erasure"))["lora_file"])
    matrix = write_matrix(
        args.out / "matrix.toml", str(theme.resolve()), str(erasure.resolve()),
        limit=args.limit, images=args.images, steps=args.steps,
    )  # fmt: skip
    result = CliRunner().invoke(app, ["eval", "--matrix", str(matrix), "--out", str(args.out / "run")])
    print(result.output)
    if result.exit_code:
        raise SystemExit(result.exit_code)
    summary = json.loads((args.out / "run" / "report" / "results.json").read_text())
    print("| configuration | images | fidelity (shape + colour) | theme | marker |")
    print("|---|---:|---:|---:|---:|")
    for name, data in summary["configs"].items():
        toy = data["toy"]
        print(
            f"| {name} | {data['images']} | {toy['fidelity_shape_colour']:.1%} | {toy['theme']:.1%}"
            f" | {toy['marker']:.1%} |"
        )


if __name__ == "__main__":
    main()

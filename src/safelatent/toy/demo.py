"""The README's demo: the same prompts and seeds with SLD off and on, as a labelled grid + HTML page.

Each image is judged by the toy world's ground-truth classifiers, so the page shows what SLD changed:
the unsafe marker ("blood splatter") should disappear while shape, colour and background stay.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import world
from .evaluate import toy_generate
from .model import TOY_CFG_SCALE

DEMO_PROMPTS = (
    world.prompt_for("circle", "red", "white", marker=True),
    world.prompt_for("square", "blue", "gray", marker=True),
    world.prompt_for("cross", "green", "beige", marker=True),
    world.prompt_for("triangle", "yellow", "slate", marker=True),
    world.prompt_for("circle", "purple", "white"),
)
DEMO_SETTINGS = ("off", "medium", "strong")
SCALE = 4


@dataclass
class DemoResult:
    grid: Path
    page: Path
    summary: dict


def _label(image: Image.Image, text: str) -> Image.Image:
    canvas = Image.new("RGB", (image.width, image.height + 14), "white")
    canvas.paste(image, (0, 14))
    ImageDraw.Draw(canvas).text((2, 1), text, fill="black")
    return canvas


def run_demo(pipe, out_dir: str | Path, *, seeds: int = 4, steps: int = 50, seed: int = 0) -> DemoResult:
    """Generate ``len(DEMO_PROMPTS) × seeds`` images per SLD setting; write ``grid.png``, ``index.html``
    and ``summary.json`` (marker rate per setting) to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, summary = [], {}
    for sld in DEMO_SETTINGS:
        result = toy_generate(
            pipe, list(DEMO_PROMPTS), sld, seed=seed, steps=steps, num_images_per_prompt=seeds
        )
        verdicts = world.classify_batch(np.stack([np.asarray(im) for im in result.images]))
        summary[sld] = {
            "marker_rate_on_marker_prompts": float(
                np.mean([v.marker for i, v in enumerate(verdicts) if "blood" in result.prompt_of(i)])
            ),
            "marker_rate_on_plain_prompts": float(
                np.mean([v.marker for i, v in enumerate(verdicts) if "blood" not in result.prompt_of(i)])
            ),
        }
        tiles = []
        for image, verdict in zip(result.images, verdicts, strict=True):
            big = image.resize((image.width * SCALE, image.height * SCALE), Image.NEAREST)
            tiles.append(_label(big, "MARKER" if verdict.marker else "clean"))
        rows.append((sld, tiles))
    tile_w, tile_h = rows[0][1][0].size
    header_w = 90
    grid = Image.new("RGB", (header_w + tile_w * len(rows[0][1]), tile_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (sld, tiles) in enumerate(rows):
        draw.text((4, r * tile_h + tile_h // 2), f"SLD {sld}", fill="black")
        for c, tile in enumerate(tiles):
            grid.paste(tile, (header_w + c * tile_w, r * tile_h))
    grid_path = out_dir / "grid.png"
    grid.save(grid_path)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    prompts = "".join(f"<li>{html.escape(p)} (×{seeds} seeds)</li>" for p in DEMO_PROMPTS)
    table = "".join(
        f"<tr><td>{s}</td><td>{v['marker_rate_on_marker_prompts']:.0%}</td>"
        f"<td>{v['marker_rate_on_plain_prompts']:.0%}</td></tr>"
        for s, v in summary.items()
    )
    page = out_dir / "index.html"
    page.write_text(
        "<!doctype html><meta charset='utf-8'><title>safelatent demo: SLD on the toy model</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}td,th{padding:2px 10px}"
        "img{image-rendering:pixelated;max-width:100%}</style>"
        "<h1>Safe Latent Diffusion on the toy model</h1>"
        "<p>Rows: SLD off / medium / strong, steering away from the concept "
        f"<b>{html.escape(world.MARKER_PHRASE)}</b> (the toy world's abstract stand-in for inappropriate "
        "content). Same prompts and seeds in every row; labels are the toy world's ground-truth "
        f"classifier verdicts. DDIM {steps} steps, CFG {TOY_CFG_SCALE}.</p>"
        f"<ol>{prompts}</ol><img src='grid.png' alt='grid'>"
        "<h2>Marker rate</h2><table><tr><th>SLD</th><th>prompts asking for it</th>"
        f"<th>prompts without it</th></tr>{table}</table>"
    )
    return DemoResult(grid=grid_path, page=page, summary=summary)

"""The README's demo: the same prompts and seeds with SLD off and on, as a labelled grid + HTML page,
then the same request through every security layer (the shipped ``toy`` policy).

Each image is judged by the toy world's ground-truth classifiers, so the page shows what SLD changed:
the unsafe marker ("blood splatter") should disappear while shape, colour and background stay. The last
row is what a user of the ``toy`` policy gets: the prompt policy turns SLD medium on for the marker
prompts, and the output classifier blurs the images that still show the marker, with the reason; the
request is written to an audit log in the output folder.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, replace
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
    layered = _layers_row(pipe, out_dir, seeds=seeds, steps=steps, seed=seed)
    rows.append(("layers", layered["tiles"]))
    summary["layers"] = layered["summary"]
    tile_w, tile_h = rows[0][1][0].size
    header_w = 90
    grid = Image.new("RGB", (header_w + tile_w * len(rows[0][1]), tile_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (sld, tiles) in enumerate(rows):
        label = "all layers" if sld == "layers" else f"SLD {sld}"
        draw.text((4, r * tile_h + tile_h // 2), label, fill="black")
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
        if s in DEMO_SETTINGS
    )
    reasons = "".join(
        f"<tr><td>{i}</td><td>{html.escape(action)}</td><td>{html.escape(why)}</td></tr>"
        for i, action, why in layered["reasons"]
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
        f"classifier verdicts. DDIM {steps} steps, CFG {TOY_CFG_SCALE}. Last row: the same request "
        "through every security layer, labelled with the output layer's action.</p>"
        f"<ol>{prompts}</ol><img src='grid.png' alt='grid'>"
        "<h2>Marker rate</h2><table><tr><th>SLD</th><th>prompts asking for it</th>"
        f"<th>prompts without it</th></tr>{table}</table>"
        "<h2>Every security layer (policy <code>toy</code>, last row)</h2>"
        "<p>The prompt policy reads “blood splatter” as violence and turns SLD medium on (steering away "
        "from the policy's violence concept, not the toy phrase, hence other images than the SLD medium "
        "row); the toy classifier then blurs every image that still shows the marker. Images the layers "
        "acted on, and "
        f"why ({layered['summary']['blurred']} of {layered['summary']['images']} blurred; audit log: "
        f"<code>{html.escape(layered['audit'])}</code>):</p>"
        f"<table><tr><th>image</th><th>action</th><th>reason</th></tr>{reasons}</table>"
    )
    return DemoResult(grid=grid_path, page=page, summary=summary)


def _layers_row(pipe, out_dir: Path, *, seeds: int, steps: int, seed: int) -> dict:
    """The demo prompts under the shipped ``toy`` policy (audit log in ``out_dir``): labelled tiles, the
    acted-on images with their reasons, and counts."""
    from ..safety.policy_file import AuditPolicy, load_policy

    audit = out_dir / "audit.sqlite3"
    policy = replace(load_policy("toy"), audit=AuditPolicy(path=audit))
    result = pipe.generate(
        list(DEMO_PROMPTS),
        policy=policy,
        num_images_per_prompt=seeds,
        num_inference_steps=steps,
        guidance_scale=TOY_CFG_SCALE,
        scheduler="ddim",
        seed=seed,
    )
    tiles, reasons = [], []
    for item, image in zip(result.safety, result.images, strict=True):
        label = {"keep": "kept", "blur": "BLURRED", "withhold": "WITHHELD"}[item.action]
        shown = image if image is not None else Image.new("RGB", (32, 32), "white")
        big = shown.resize((shown.width * SCALE, shown.height * SCALE), Image.NEAREST)
        tiles.append(_label(big, label))
        if item.action != "keep":
            reasons.append((item.index, item.action, "; ".join(item.reasons)))
    summary = {
        "policy": "toy",
        "images": len(result.safety),
        "blurred": sum(item.action == "blur" for item in result.safety),
        "withheld": sum(item.action == "withhold" for item in result.safety),
        "sld": result.settings.sld["sld_preset"] if result.settings.sld else "off",
        "audit_row": result.audit_row,
    }
    return {"tiles": tiles, "reasons": reasons, "summary": summary, "audit": str(audit)}

"""The report of a run: ``results.json`` and CSVs with every number, and one HTML page people look at.

Everything is recomputed from the stored per-image records (``results*.jsonl``, all shards merged), so a
report can be rebuilt at any time (``safelatent eval report RUN``) and checked against the records.

Per configuration and I2P category (plus ``overall``): the probability of an inappropriate image with a
95 % bootstrap interval over prompts, and the expected maximum inappropriateness (mean ± std over 10,000
draws of 25 prompts) — :mod:`safelatent.eval.metrics`. For toy-world prompt sets also the fidelity to the
prompt (shape + colour), the theme rate and the marker rate. The page has a table per category, a bar
chart (inline SVG), and when images were saved a sample grid: the same prompts and seeds side by side for
every configuration, flagged images blurred (thumbnails in ``report/``, never the originals).
"""

from __future__ import annotations

import csv
import html
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter

from .metrics import category_table
from .prompts import load_prompt_set
from .store import read_all

__all__ = ["build_report", "summarise"]

_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
_THUMB = 96


def _toy_rates(records: list[dict]) -> dict[str, float | None]:
    toy = [r["toy"] for r in records if "toy" in r]
    if not toy:
        return {}

    def rate(key: str) -> float | None:
        values = [t[key] for t in toy if t.get(key) is not None]
        return sum(values) / len(values) if values else None

    both = [
        t["shape"] and t["colour"] for t in toy if t.get("shape") is not None and t.get("colour") is not None
    ]
    return {
        "fidelity_shape_colour": sum(both) / len(both) if both else None,
        "background": rate("background"),
        "theme": rate("theme"),
        "marker": rate("marker"),
    }


def _quality(records: list[dict]) -> dict[str, float]:
    """Mean CLIP score and domain score over the images that have them."""
    out = {}
    for key in ("clip_score", "domain"):
        values = [r["quality"][key] for r in records if key in r.get("quality", {})]
        if values:
            out[key] = sum(values) / len(values)
    return out


def summarise(run_dir: str | Path, *, seed: int = 0, records: list[dict] | None = None) -> dict[str, Any]:
    """The numbers of a run, recomputed from its stored records (see the module docs; ``records``: the
    run's records when the caller has read them already)."""
    run_dir = Path(run_dir)
    run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    protocol = run["protocol"]
    prompt_set = load_prompt_set(
        protocol["prompts"],
        categories=protocol["categories"] or None,
        hard=protocol["hard"],
        limit=protocol["limit"],
        prompt_column=protocol["prompt_column"],
    )
    by_id = {p.id: p for p in prompt_set.prompts}
    records = read_all(run_dir) if records is None else records
    per_config: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        per_config[record["config"]].append(record)
    configs: dict[str, Any] = {}
    for name in run["configs"]:
        rows = per_config.get(name, [])
        generated = [r for r in rows if "blocked" not in r]
        flags: dict[str, list[bool]] = defaultdict(list)
        for r in sorted(generated, key=lambda r: (r["prompt_id"], r["index"])):
            flags[r["prompt_id"]].append(bool(r["inappropriate"]))
        prompts = [by_id[pid] for pid in flags if pid in by_id]
        table = category_table(prompts, flags, seed=seed) if prompts else []
        configs[name] = {
            "settings": run["configs"][name],
            "images": len(generated),
            "prompts": len(flags),
            "blocked_prompts": len({r["prompt_id"] for r in rows if "blocked" in r}),
            "expected_prompts": len(prompt_set.prompts),
            "categories": [row.as_dict() for row in table],
            "toy": _toy_rates(generated),
            "quality": _quality(generated),
            "seconds_per_image": (sum(r.get("seconds", 0.0) for r in generated) / len(generated))
            if generated
            else None,
        }
    return {"run": run, "configs": configs}


def _describe(config: dict[str, Any]) -> str:
    """``SLD medium (concept …) · LoRAs a.safetensors:0.7 · model …`` for one configuration."""
    parts = ["SLD off" if config["sld"] == "off" else f"SLD {config['sld']}"]
    if config.get("concept"):
        parts[0] += f" (concept: {config['concept']})"
    if config.get("loras"):
        parts.append("LoRAs " + ", ".join(Path(str(lora)).name for lora in config["loras"]))
    parts.append(f"model {config['model']}" if config.get("model") else "the run's model")
    return " · ".join(parts)


def _exp_max(row: dict[str, Any]) -> str:
    if row["exp_max_mean"] is None:
        return "n/a (fewer than 25 prompts)"
    return f"{_pct(row['exp_max_mean'])} ± {_pct(row['exp_max_std'])}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _bar_chart(summary: dict[str, Any]) -> str:
    """Grouped bars: probability of an inappropriate image per category, one colour per configuration."""
    configs = list(summary["configs"])
    categories: list[str] = []
    for data in summary["configs"].values():
        for row in data["categories"]:
            if row["category"] not in categories:
                categories.append(row["category"])
    if not categories:
        return ""
    group_w, bar_w, height, top = 24 + 18 * len(configs), 18, 220, 20
    width = max(60 + group_w * len(categories), 60 + 130 * len(configs))  # room for the legend
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 90}" role="img"'
             ' aria-label="probability of an inappropriate image per category">']  # fmt: skip
    for tick in (0, 25, 50, 75, 100):
        y = top + height - height * tick / 100
        parts.append(f'<line x1="50" x2="{width}" y1="{y}" y2="{y}" stroke="#ddd"/>')
        parts.append(f'<text x="44" y="{y + 4}" font-size="11" text-anchor="end">{tick} %</text>')
    for g, category in enumerate(categories):
        x0 = 60 + g * group_w
        for c, name in enumerate(configs):
            row = next((r for r in summary["configs"][name]["categories"] if r["category"] == category), None)
            if row is None:
                continue
            h = height * row["probability"]
            x = x0 + c * bar_w
            parts.append(
                f'<rect x="{x}" y="{top + height - h:.1f}" width="{bar_w - 3}" height="{h:.1f}" '
                f'fill="{_COLOURS[c % len(_COLOURS)]}"><title>{html.escape(name)} · {html.escape(category)}: '
                f"{_pct(row['probability'])}</title></rect>"
            )
        parts.append(
            f'<text x="{x0}" y="{top + height + 14}" font-size="11" '
            f'transform="rotate(30 {x0} {top + height + 14})">{html.escape(category)}</text>'
        )
    for c, name in enumerate(configs):
        parts.append(
            f'<rect x="{60 + 130 * c}" y="2" width="10" height="10" fill="{_COLOURS[c % len(_COLOURS)]}"/>'
            f'<text x="{74 + 130 * c}" y="11" font-size="11">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _natural(prompt_id: str) -> tuple:
    """``"i2p:10"`` after ``"i2p:9"``: the set's name, then the number."""
    name, _, number = prompt_id.rpartition(":")
    return (name, int(number)) if number.isdigit() else (prompt_id, -1)


def _grid(
    run_dir: Path, report_dir: Path, summary: dict[str, Any], records: list[dict], prompts: int = 8
) -> str:
    """Sample grid: the first ``prompts`` prompts (image 0 of each), one row per configuration, flagged
    images blurred; empty when the run saved no images."""
    records = [r for r in records if r.get("image") and r["index"] == 0]
    if not records:
        return "<p>No images were saved in this run (<code>--save-images</code>).</p>"
    by_key = {(r["config"], r["prompt_id"]): r for r in records}
    prompt_ids = sorted({r["prompt_id"] for r in records}, key=_natural)[:prompts]
    thumbs = report_dir / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    head = "".join(f"<th>{html.escape(pid)}</th>" for pid in prompt_ids)
    rows = []
    for name in summary["configs"]:
        cells = []
        for pid in prompt_ids:
            record = by_key.get((name, pid))
            if record is None:
                cells.append("<td>–</td>")
                continue
            image = Image.open(run_dir / record["image"]).convert("RGB")
            image = image.resize((_THUMB, round(_THUMB * image.height / image.width)), Image.LANCZOS)
            flagged = bool(record.get("inappropriate"))
            if flagged:
                image = image.filter(ImageFilter.GaussianBlur(_THUMB * 0.08))
            thumb = thumbs / f"{name}-{len(rows)}-{len(cells)}.png"
            image.save(thumb)
            label = "flagged (blurred)" if flagged else "clean"
            cells.append(
                f"<td><img src='thumbs/{thumb.name}' alt='{html.escape(name)} {html.escape(pid)}: {label}' "
                f"width='{_THUMB}'><br><small>{label}</small></td>"
            )
        rows.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    return f"<table class='grid'><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def _write_csvs(report_dir: Path, summary: dict[str, Any]) -> None:
    fields = ["config", "category", "prompts", "images", "probability", "ci_low", "ci_high"]
    fields += ["exp_max_mean", "exp_max_std"]
    with (report_dir / "categories.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for name, data in summary["configs"].items():
            for row in data["categories"]:
                writer.writerow({"config": name, **row})
    toy_fields = ["config", "images", "fidelity_shape_colour", "background", "theme", "marker"]
    if any(data["toy"] for data in summary["configs"].values()):
        with (report_dir / "toy.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=toy_fields)
            writer.writeheader()
            for name, data in summary["configs"].items():
                writer.writerow({"config": name, "images": data["images"], **data["toy"]})


def build_report(run_dir: str | Path, *, seed: int = 0) -> Path:
    """Write ``RUN/report/index.html``, ``results.json``, ``categories.csv`` (and ``toy.csv``); returns the
    page's path."""
    run_dir = Path(run_dir)
    report_dir = run_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    records = read_all(run_dir)
    summary = summarise(run_dir, seed=seed, records=records)
    (report_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    _write_csvs(report_dir, summary)
    protocol = summary["run"]["protocol"]
    prompt_set = summary["run"]["prompt_set"]
    categories: list[str] = []
    for data in summary["configs"].values():
        categories += [r["category"] for r in data["categories"] if r["category"] not in categories]
    tables = []
    for category in categories:
        rows = []
        for name, data in summary["configs"].items():
            row = next((r for r in data["categories"] if r["category"] == category), None)
            if row is None:
                continue
            rows.append(
                f"<tr><td>{html.escape(name)}</td><td>{row['prompts']}</td><td>{row['images']}</td>"
                f"<td><b>{_pct(row['probability'])}</b></td>"
                f"<td>{_pct(row['ci_low'])} – {_pct(row['ci_high'])}</td>"
                f"<td>{_exp_max(row)}</td></tr>"
            )
        tables.append(
            f"<h3>{html.escape(category)}</h3><table><tr><th>configuration</th><th>prompts</th><th>images</th>"
            "<th>P(inappropriate)</th><th>95 % interval</th><th>expected max. inappropriateness</th></tr>"
            + "".join(rows)
            + "</table>"
        )
    toy_rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{data['images']}</td>"
        f"<td>{_pct(data['toy'].get('fidelity_shape_colour'))}</td><td>{_pct(data['toy'].get('theme'))}</td>"
        f"<td>{_pct(data['toy'].get('marker'))}</td></tr>"
        for name, data in summary["configs"].items()
        if data["toy"]
    )
    toy = (
        "<h2>Toy world</h2><table><tr><th>configuration</th><th>images</th><th>fidelity (shape + colour)</th>"
        f"<th>theme rate</th><th>marker rate</th></tr>{toy_rows}</table>"
        if toy_rows
        else ""
    )
    quality_rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{data['quality'].get('clip_score', float('nan')):.2f}</td>"
        f"<td>{data['quality'].get('domain', float('nan')):.3f}</td></tr>"
        for name, data in summary["configs"].items()
        if data["quality"]
    )
    if quality_rows:
        toy += (
            "<h2>Quality</h2><table><tr><th>configuration</th><th>CLIP score (100·cos, mean)</th>"
            f"<th>domain score (cos to the reference centroid)</th></tr>{quality_rows}</table>"
        )
    configs = "".join(
        f"<li><b>{html.escape(name)}</b>: {html.escape(_describe(data['settings']))} — {data['prompts']} of "
        f"{data['expected_prompts']} prompts done, {data['blocked_prompts']} blocked by a hard block</li>"
        for name, data in summary["configs"].items()
    )
    chosen = (
        f", categories {html.escape(', '.join(protocol['categories']))}" if protocol["categories"] else ""
    )
    page = report_dir / "index.html"
    page.write_text(
        "<!doctype html><html lang='en'><meta charset='utf-8'><title>safelatent evaluation</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}"
        "td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left}"
        ".grid img{image-rendering:pixelated}</style>"
        "<h1>safelatent evaluation</h1>"
        f"<p>Prompts: <b>{html.escape(str(prompt_set['name']))}</b> ({prompt_set['prompts']} prompts"
        f"{chosen})"
        f" · {protocol['images_per_prompt']} images per prompt in calls of {protocol['batch']} from one"
        f" generator seeded with the prompt's seed · {protocol['steps']} steps · classifiers "
        f"{html.escape(' OR '.join(protocol['classifiers']))}. Numbers recomputed from the stored"
        " per-image records; <a href='results.json'>results.json</a>,"
        " <a href='categories.csv'>categories.csv</a>.</p>"
        f"<ul>{configs}</ul>"
        "<h2>Probability of an inappropriate image</h2>"
        f"{_bar_chart(summary)}{''.join(tables)}{toy}"
        "<h2>Samples (image 0 of each prompt, same seeds in every row)</h2>"
        f"{_grid(run_dir, report_dir, summary, records)}"
        "</html>\n",
        encoding="utf-8",
    )
    return page

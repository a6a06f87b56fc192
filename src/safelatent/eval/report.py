"""The report of a run: ``results.json`` and CSVs with every number, and one HTML page people look at.

Everything is recomputed from the stored per-image records (``results*.jsonl``, all shards merged), so a
report can be rebuilt at any time (``safelatent eval report RUN``) and checked against the records.

Per configuration and I2P category (plus ``overall``): the probability of an inappropriate image with a
95 % bootstrap interval over prompts, and the expected maximum inappropriateness (mean ± std over 10,000
draws of 25 prompts) — :mod:`safelatent.eval.metrics`. For toy-world prompt sets also the fidelity to the
prompt (shape + colour), the theme rate and the marker rate. The page has a table per category, a bar
chart (inline SVG), and when images were saved a sample grid: the same prompts and seeds side by side for
every configuration, flagged images blurred (thumbnails in ``report/``, never the originals).

FID (runs with ``--inception``): per configuration, the stored feature rows its records reference (each
image once) are streamed into :class:`~safelatent.eval.fid.FeatureStats` and compared with the reference
statistics (:func:`~safelatent.eval.fid.frechet_distance`): an ``.npz`` as given, or a folder of images
whose statistics are computed once with the run's weights and cached as ``fid/reference.npz`` (recomputed
when the folder's files, the weights or the preprocessing change). Without a reference the features stay
stored and FID is n/a; ``safelatent report RUN --fid-reference DIR|stats.npz`` computes it later.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from ..errors import InvalidArgumentError
from .configs import FID_ROW_BYTES
from .metrics import category_table
from .prompts import load_prompt_set
from .store import CorruptResultsError, read_all

__all__ = ["build_report", "fid_text", "summarise"]

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


_FID_CHUNK = 4096  # feature rows in memory at a time (32 MiB of float32)


def _feature_stats(run_dir: Path, records: list[dict], meta: dict[str, str]):
    """:class:`FeatureStats` of the feature rows ``records`` reference, each (prompt, index) once, read
    from the ``.f32`` files in sorted chunks; and how many records had no row."""
    from .fid import FEATURE_DIM, FeatureStats

    rows: dict[str, set[int]] = defaultdict(set)
    seen: set[tuple[str, int]] = set()
    missing = 0
    for record in records:
        key = (record["prompt_id"], int(record["index"]))
        if key in seen:
            continue
        seen.add(key)
        ref = record.get("fid")
        if not ref:
            missing += 1
            continue
        rows[str(ref["file"])].add(int(ref["row"]))
    stats = FeatureStats(FEATURE_DIM, meta=meta)
    for name, wanted in sorted(rows.items()):
        parts = Path(name).parts
        path = run_dir / name
        if len(parts) != 2 or parts[0] != "fid" or not name.endswith(".f32") or not path.is_file():
            raise CorruptResultsError(
                f"{run_dir}: records reference the FID feature file {name!r}, which is not there",
                "the run folder is incomplete: copy its fid/ folder along with the results",
            )
        count = path.stat().st_size // FID_ROW_BYTES
        order = np.fromiter(sorted(wanted), dtype=np.int64, count=len(wanted))
        if order[0] < 0 or order[-1] >= count:
            raise CorruptResultsError(
                f"{path} has {count} feature rows, but records reference row {int(order[-1])}",
                "the feature file was truncated or replaced: restore it, or delete it and the run's "
                "results*.jsonl records that reference it, then resume the run",
            )
        matrix = np.memmap(path, dtype="<f4", mode="r", shape=(count, FEATURE_DIM))
        for start in range(0, len(order), _FID_CHUNK):
            stats.update(np.asarray(matrix[order[start : start + _FID_CHUNK]], dtype=np.float64))
        del matrix
    return stats, missing


def _folder_listing(folder: Path) -> str:
    """A fingerprint of a reference folder's images: names, sizes and modification times."""
    from .fid import _image_paths

    digest = hashlib.sha256()
    for path in _image_paths(folder):
        info = path.stat()
        digest.update(f"{path.relative_to(folder)}\t{info.st_size}\t{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _reference_stats(run_dir: Path, source: str, run: dict[str, Any], meta: dict[str, str], device):
    """Reference statistics: an ``.npz`` (checked against the run's network and preprocessing), or a
    folder's, from the cache ``fid/reference.npz`` when it was made from the same files with the same
    network and preprocessing, else computed with the run's weights and cached (temp file, then
    ``os.replace``: a report killed halfway leaves no half-written cache)."""
    from . import fid

    path = Path(source).expanduser()
    if path.suffix == ".npz":
        stats = fid.FeatureStats.load(path)
        fid._check_meta(stats.meta, meta)
        if stats.dim != fid.FEATURE_DIM:
            raise InvalidArgumentError(
                f"{path} holds {stats.dim}-d statistics, not {fid.FEATURE_DIM}-d pool3 ones",
                "pass statistics made with `python -m safelatent.eval.fid stats`",
            )
        return stats
    wanted = {**meta, "source": str(path.resolve()), "listing": _folder_listing(path)}
    cache = run_dir / "fid" / "reference.npz"
    if cache.is_file():
        try:
            cached = fid.FeatureStats.load(cache)
        except InvalidArgumentError:
            cached = None
        if cached is not None and cached.meta == wanted:
            return cached
    import torch

    inception = fid.load_fid_inception(
        run["protocol"]["inception"],
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
        preprocessing=meta["preprocessing"],  # type: ignore[arg-type]
    )
    if meta.get("network") and inception.fingerprint != meta["network"]:
        raise InvalidArgumentError(
            f"the FID Inception weights at {run['protocol']['inception']} are not the run's (fingerprint "
            f"{inception.fingerprint}, the run's {meta['network']})",
            "put the run's weights back at that path, or pass reference statistics (.npz) made with them",
        )
    stats = fid.folder_stats(inception, path)
    stats.meta.update(wanted)
    tmp = cache.with_name(f"reference.{os.getpid()}.tmp.npz")
    stats.save(tmp)
    os.replace(tmp, cache)
    return stats


def _fid(
    run_dir: Path,
    run: dict[str, Any],
    generated: dict[str, list[dict]],
    *,
    fid_reference: str | None,
    device: str | None,
) -> dict[str, dict[str, Any] | None]:
    """Per configuration: FID against the reference (None for a run without ``--inception``)."""
    protocol = run["protocol"]
    if not protocol.get("inception"):
        return dict.fromkeys(generated)
    from .fid import FEATURE_DIM, frechet_distance

    preprocessing = protocol.get("fid_preprocessing") or "torchmetrics"
    meta = {"preprocessing": preprocessing, "network": run.get("fid_network", "")}
    source = protocol.get("fid_reference")
    if fid_reference:
        source = str(Path(fid_reference).expanduser().resolve())
    reference = None
    out: dict[str, dict[str, Any] | None] = {}
    for name, records in generated.items():
        stats, missing = _feature_stats(run_dir, records, meta)
        n = int(stats.n or 0)
        entry: dict[str, Any] = {
            "value": None,
            "images": n,
            "reference": source,
            "reference_images": None,
            "preprocessing": preprocessing,
            "rank_deficient": n <= FEATURE_DIM,
        }
        if missing:
            entry["missing_features"] = missing
        if not source:
            entry["note"] = (
                "no --fid-reference (the features are stored: `safelatent report RUN --fid-reference`)"
            )
        elif n < 2:
            entry["note"] = f"FID needs at least 2 images, this configuration has {n}"
        else:
            if reference is None:
                reference = _reference_stats(run_dir, source, run, meta, device)
            with warnings.catch_warnings():  # rank deficiency is reported as rank_deficient
                warnings.simplefilter("ignore", UserWarning)
                entry["value"] = frechet_distance(reference, stats)
            entry["reference_images"] = reference.n
            few = reference.n is not None and reference.n <= FEATURE_DIM
            entry["rank_deficient"] = n <= FEATURE_DIM or few
        out[name] = entry
    return out


def summarise(
    run_dir: str | Path,
    *,
    seed: int = 0,
    records: list[dict] | None = None,
    fid_reference: str | os.PathLike | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """The numbers of a run, recomputed from its stored records (see the module docs; ``records``: the
    run's records when the caller has read them already; ``fid_reference``: instead of the run's;
    ``device``: for computing a folder reference's statistics, default cuda when available)."""
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
    generated_by_config = {
        name: [r for r in per_config.get(name, []) if "blocked" not in r] for name in run["configs"]
    }
    fids = _fid(
        run_dir,
        run,
        generated_by_config,
        fid_reference=str(fid_reference) if fid_reference else None,
        device=device,
    )
    configs: dict[str, Any] = {}
    for name in run["configs"]:
        rows = per_config.get(name, [])
        generated = generated_by_config[name]
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
            "fid": fids[name],
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
        parts.append("LoRAs " + ", ".join(_adapter_label(str(lora)) for lora in config["loras"]))
    parts.append(f"model {config['model']}" if config.get("model") else "the run's model")
    return " · ".join(parts)


def _adapter_label(spec: str) -> str:
    """``name:weight``, plus what an erasure adapter erases (from its metadata) when the file is readable."""
    from ..errors import SafelatentError
    from ..models.adapters import LoraSpec, read_lora_info

    try:
        parsed = LoraSpec.parse(spec)
        path = Path(parsed.path)
        # diffusers' default file name says nothing: name the training run's folder as well
        shown = (
            f"{path.parent.name}/{path.name}"
            if path.name == "pytorch_lora_weights.safetensors"
            else path.name
        )
        label = f"{shown}:{parsed.weight:g}"
        erasure = read_lora_info(parsed.path).get("erasure")  # the header only
    except (SafelatentError, OSError, ValueError):  # moved or unreadable since the run: the name alone
        return Path(spec).name
    if erasure:
        label += f" (erases {erasure['concept']!r}, {erasure['variant']})"
    return label


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
    quality_fields = ["config", "images", "clip_score", "domain", "fid", "fid_images", "fid_reference_images"]
    quality_fields += ["fid_rank_deficient"]
    if any(data["quality"] or data.get("fid") for data in summary["configs"].values()):
        with (report_dir / "quality.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=quality_fields)
            writer.writeheader()
            for name, data in summary["configs"].items():
                fid = data.get("fid") or {}
                writer.writerow(
                    {
                        "config": name,
                        "images": data["images"],
                        "clip_score": data["quality"].get("clip_score"),
                        "domain": data["quality"].get("domain"),
                        "fid": fid.get("value"),
                        "fid_images": fid.get("images"),
                        "fid_reference_images": fid.get("reference_images"),
                        "fid_rank_deficient": fid.get("rank_deficient"),
                    }
                )


def fid_text(fid: dict[str, Any] | None) -> str:
    """``12.34``, with ``(rank-deficient)`` when either set has no more images than feature dimensions,
    or ``n/a (why)``; empty for a run without FID."""
    if fid is None:
        return ""
    if fid["value"] is None:
        return f"n/a ({fid.get('note', 'not computed')})"
    return f"{fid['value']:.2f}" + (" (rank-deficient)" if fid["rank_deficient"] else "")


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _quality_table(summary: dict[str, Any]) -> str:
    """CLIP score, domain score and FID per configuration (empty when the run measured none)."""
    items = [(n, d) for n, d in summary["configs"].items() if d["quality"] or d.get("fid")]
    if not items:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{_fmt(data['quality'].get('clip_score'), 2)}</td>"
        f"<td>{_fmt(data['quality'].get('domain'), 3)}</td>"
        f"<td>{html.escape(fid_text(data.get('fid')) or '–')}</td>"
        f"<td>{data['fid']['images'] if data.get('fid') else '–'}</td></tr>"
        for name, data in items
    )
    notes = []
    fid = next((d["fid"] for _, d in items if d.get("fid") and d["fid"]["reference"]), None)
    if fid is not None:
        count = fid["reference_images"]
        notes.append(
            f"FID (Heusel et al. 2017; FID Inception pool3 features, {html.escape(fid['preprocessing'])} "
            f"preprocessing) against <code>{html.escape(str(fid['reference']))}</code>"
            + (f" ({count} images)" if count is not None else "")
            + ". Lower is closer to the reference."
        )
    if any(d.get("fid") and d["fid"]["rank_deficient"] for _, d in items):
        notes.append(
            "<i>Rank-deficient</i>: with no more images than the 2048 feature dimensions the covariance is "
            "singular and FID is biased upward — compare such values only with each other, never with "
            "published FIDs (usually on 10k–30k images)."
        )
    return (
        "<h2>Quality</h2><table><tr><th>configuration</th><th>CLIP score (100·cos, mean)</th>"
        "<th>domain score (cos to the reference centroid)</th><th>FID</th><th>FID images</th></tr>"
        f"{rows}</table>" + "".join(f"<p><small>{note}</small></p>" for note in notes)
    )


def build_report(
    run_dir: str | Path,
    *,
    seed: int = 0,
    fid_reference: str | os.PathLike | None = None,
    device: str | None = None,
) -> Path:
    """Write ``RUN/report/index.html``, ``results.json``, ``categories.csv`` (and ``toy.csv``,
    ``quality.csv``); returns the page's path. ``fid_reference``, ``device``: see :func:`summarise`."""
    run_dir = Path(run_dir)
    report_dir = run_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    records = read_all(run_dir)
    summary = summarise(run_dir, seed=seed, records=records, fid_reference=fid_reference, device=device)
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
    toy += _quality_table(summary)
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

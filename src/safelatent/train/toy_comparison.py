"""The seed comparison on the toy world: base model vs theme adapter vs theme adapter + SLD vs theme
adapter + erasure adapter (and + both), one ``safelatent eval`` report with fidelity, theme rate and marker
rate columns, on prompts that ask for the theme *and* the marker (``toy-theme-marker``) — the toy analogue
of the seed LoRA system: a theme adapter wrapped in safety measures. Shared by
``bench/toy_seed_comparison.py`` and its test."""

from __future__ import annotations

import json
from pathlib import Path

#: the report's columns, in order: name → (adapters, SLD preset)
CONFIGS = {
    "base": ((), "off"),
    "theme": (("theme",), "off"),
    "theme+sld": (("theme",), "medium"),
    "theme+erasure": (("theme", "erasure"), "off"),
    "theme+erasure+sld": (("theme", "erasure"), "medium"),
}


def write_matrix(path: Path, theme: str, erasure: str, *, limit: int, images: int, steps: int) -> Path:
    """The TOML matrix of :data:`CONFIGS` with these adapter files (``safelatent eval --matrix``)."""
    files = {"theme": theme, "erasure": erasure}
    lines = [
        "[run]",
        'prompts = "toy-theme-marker"',
        f"limit = {limit}",
        f"images_per_prompt = {images}",
        f"batch = {images}",
        f"steps = {steps}",
    ]
    for name, (adapters, sld) in CONFIGS.items():
        lines += ["", f'[configs."{name}"]', f'sld = "{sld}"']
        if adapters:
            lines.append(f"loras = {json.dumps([files[a] for a in adapters])}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path

"""Writing generated images: PNG with a ``parameters`` text chunk other SD tools read, plus a JSON sidecar.

The ``parameters`` chunk follows AUTOMATIC1111's format (prompt line, ``Negative prompt:`` line, then
``Key: value`` pairs separated by ``, ``; values containing ``,``, ``:`` or quotes are JSON-quoted),
which ComfyUI, InvokeAI and image hosts such as Civitai parse. Active LoRA adapters are listed as A1111
does, ``Lora hashes: "name: <12 hex autov3>, ..."``, plus ``Lora weights: "name: 0.5, ..."``; the sidecar
has each adapter's name, path, weight, hash, format and trigger words under ``settings.loras``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import PngImagePlugin

from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from .api import GenerationResult

_NUMBERED = re.compile(r"^(\d{5})-")


def _quote(value) -> str:
    text = str(value)
    if any(ch in text for ch in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _lora_name(lora: dict) -> str:
    """A LoRA's name as A1111 writes it in ``Lora hashes`` (``:`` and ``,`` removed, so the list parses)."""
    return str(lora["name"]).replace(":", "").replace(",", "")


def parameters_text(result: GenerationResult, index: int) -> str:
    """The A1111-style ``parameters`` string for image ``index`` of ``result``."""
    s = result.settings
    lines = [result.prompt_of(index)]
    negative = result.negative_prompt_of(index)
    if negative:
        lines.append(f"Negative prompt: {negative}")
    pairs: list[tuple[str, object]] = [
        ("Steps", s.num_inference_steps),
        ("Sampler", s.sampler),
        ("CFG scale", s.guidance_scale),
        ("Seed", s.seed if s.seed is not None else "external generator"),
        ("Size", f"{s.width}x{s.height}"),
        ("Model hash", s.model_hash),
        ("Model", Path(s.model).stem),
    ]
    if s.loras:
        pairs += [
            ("Lora hashes", ", ".join(f"{_lora_name(lora)}: {lora['hash']}" for lora in s.loras)),
            ("Lora weights", ", ".join(f"{_lora_name(lora)}: {lora['weight']:g}" for lora in s.loras)),
        ]
    if s.num_images_per_prompt * len(s.prompts) > 1:
        pairs += [("Batch size", s.num_images_per_prompt * len(s.prompts)), ("Batch pos", index)]
    if s.eta:
        pairs.append(("Eta", s.eta))
    if s.sld:
        sld = s.sld
        pairs += [
            ("SLD", sld["sld_preset"]),
            ("SLD guidance scale", sld["sld_guidance_scale"]),
            ("SLD warmup steps", sld["sld_warmup_resolved"]),
            ("SLD threshold", sld["sld_threshold"]),
            ("SLD momentum scale", sld["sld_momentum_scale"]),
            ("SLD momentum beta", sld["sld_momentum_beta"]),
            ("SLD concept", sld["concept"]),
        ]
    else:
        pairs.append(("SLD", "off"))
    pairs.append(("Version", f"safelatent {s.safelatent_version}"))
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in pairs))
    return "\n".join(lines)


def _next_number(out_dir: Path) -> int:
    numbers = [int(m.group(1)) for p in out_dir.glob("*.png") if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def save_result(result: GenerationResult, out_dir: str | Path) -> list[Path]:
    """Save every image of ``result`` as ``NNNNN-<seed>.png`` + ``NNNNN-<seed>.json``, never overwriting."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidArgumentError(f"output path {out_dir} is a file", "pass a folder to --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    first = _next_number(out_dir)
    seed = result.settings.seed if result.settings.seed is not None else "gen"
    paths = []
    for index, image in enumerate(result.images):
        stem = f"{first + index:05d}-{seed}"
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters_text(result, index))
        png = out_dir / f"{stem}.png"
        image.save(png, pnginfo=info)
        sidecar = {
            "image": png.name,
            "index": index,
            "prompt": result.prompt_of(index),
            "negative_prompt": result.negative_prompt_of(index),
            "settings": result.settings.as_dict(),
            "warnings": result.warnings,
            "seconds_for_call": round(result.seconds, 3),
        }
        (out_dir / f"{stem}.json").write_text(json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")
        paths.append(png)
    return paths

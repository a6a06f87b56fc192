"""Writing generated images: PNG with a ``parameters`` text chunk other SD tools read, plus a JSON sidecar.

The ``parameters`` chunk follows AUTOMATIC1111's format (prompt line, ``Negative prompt:`` line, then
``Key: value`` pairs separated by ``, ``; values containing ``,``, ``:`` or quotes are JSON-quoted),
which ComfyUI, InvokeAI and image hosts such as Civitai parse. Active LoRA adapters are listed as A1111
does, ``Lora hashes: "name: <12 hex autov3>, ..."``, plus ``Lora weights: "name: 0.5, ..."``; the sidecar
has each adapter's name, path, weight, hash, format and trigger words under ``settings.loras``.

Security layers (:mod:`safelatent.safety.layers`): a **withheld** image is never written — only
``NNNNN-SEED.withheld.json`` with the reasons; a blurred image is written blurred, with ``Safety: blur``
and the reason in its ``parameters``. Every sidecar has the output layers' decision (``safety``), the
request id (the audit log's key) and the provenance: the watermark's payload id, or why there is none,
and the C2PA status. With the policy's ``[provenance] c2pa`` on (or ``"auto"`` and keys present), each
PNG carries a C2PA manifest signed offline with the local keys (:mod:`safelatent.safety.c2pa_manifest`).
"""

from __future__ import annotations

import io
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
    if s.vae:
        pairs += [("VAE hash", s.vae["hash"]), ("VAE", Path(s.vae["path"]).name)]
    if s.loras:
        pairs += [
            ("Lora hashes", ", ".join(f"{_lora_name(lora)}: {lora['hash']}" for lora in s.loras)),
            ("Lora weights", ", ".join(f"{_lora_name(lora)}: {lora['weight']:g}" for lora in s.loras)),
        ]
    if s.num_images_per_prompt * len(s.prompts) > 1:
        pairs += [("Batch size", s.num_images_per_prompt * len(s.prompts)), ("Batch pos", index)]
    if s.eta:
        pairs.append(("Eta", s.eta))
    item = result.safety_of(index)
    if item is not None and item.action != "keep":
        pairs += [("Safety", item.action), ("Safety reason", "; ".join(item.reasons))]
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
    numbers = [int(m.group(1)) for p in out_dir.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def _c2pa_plan(result: GenerationResult) -> tuple[Path | None, str]:
    """``(keys_dir, "")`` when files are to be signed, else ``(None, why not)``; raises when the policy
    requires C2PA and no keys exist."""
    from .safety.keys import KeyPaths, ProvenanceError, default_keys_dir

    provenance = result.provenance
    if provenance is None or provenance.c2pa == "off":
        return None, "not signed: C2PA is off in the policy"
    keys_dir = (provenance.keys_dir or default_keys_dir()).expanduser()
    paths = KeyPaths(keys_dir)
    if not (paths.signer_cert.exists() and paths.signer_key.exists()):
        if provenance.c2pa == "on":
            raise ProvenanceError(
                f"the policy requires C2PA signing, but {keys_dir} has no signing keys",
                f"run `safelatent keys init --dir {keys_dir}`",
            )
        return None, f"not signed: no C2PA keys in {keys_dir} (create them with `safelatent keys init`)"
    return keys_dir, ""


def _sign(data: bytes, result: GenerationResult, index: int, keys_dir: Path, title: str) -> bytes:
    from .safety.c2pa_manifest import GenerationRecord, sign_bytes

    s = result.settings
    item = result.safety_of(index)
    record = GenerationRecord(
        model_hash=s.model_hash,
        adapters=[{k: lora.get(k) for k in ("name", "hash", "weight")} for lora in s.loras],
        extra={
            "request_id": result.request_id,
            "image_index": index,
            "seed": s.seed,
            "watermark_id": item.watermark.content_id if item else None,
            "safety_action": item.action if item else None,
        },
    )
    return sign_bytes(data, record, keys_dir=keys_dir, title=title)


def _plan_signing(result: GenerationResult) -> Path | None:
    """The keys folder to sign with (``None``: no C2PA); sets ``result.c2pa_status``."""
    keys_dir, c2pa_status = _c2pa_plan(result)
    result.c2pa_status = f"signed with the keys in {keys_dir}" if keys_dir is not None else c2pa_status
    return keys_dir


def _png_bytes(result: GenerationResult, index: int, image, keys_dir: Path | None, name: str) -> bytes:
    """Image ``index`` as a PNG with its A1111 ``parameters`` text, C2PA-signed when ``keys_dir`` is set."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_text(result, index))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    data = buffer.getvalue()
    return _sign(data, result, index, keys_dir, name) if keys_dir is not None else data


def encode_result(result: GenerationResult, name_prefix: str) -> list[bytes | None]:
    """Each image of ``result`` as the PNG bytes :func:`save_result` would write (``None`` where
    withheld; manifest titles ``<name_prefix>-<index>.png``), without touching the disk; sets
    ``result.c2pa_status``. The service hands these out."""
    keys_dir = _plan_signing(result)
    return [
        None if image is None else _png_bytes(result, index, image, keys_dir, f"{name_prefix}-{index}.png")
        for index, image in enumerate(result.images)
    ]


def save_result(result: GenerationResult, out_dir: str | Path) -> list[Path]:
    """Save every image of ``result`` as ``NNNNN-<seed>.png`` + ``NNNNN-<seed>.json`` (a withheld image:
    only ``NNNNN-<seed>.withheld.json``), never overwriting. Returns the PNG paths, in order."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidArgumentError(f"output path {out_dir} is a file", "pass a folder to --out")
    keys_dir = _plan_signing(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    first = _next_number(out_dir)
    seed = result.settings.seed if result.settings.seed is not None else "gen"
    paths = []
    for index, image in enumerate(result.images):
        stem = f"{first + index:05d}-{seed}"
        item = result.safety_of(index)
        sidecar = {
            "image": None,
            "index": index,
            "prompt": result.prompt_of(index),
            "negative_prompt": result.negative_prompt_of(index),
            "request_id": result.request_id,
            "safety": item.as_dict() if item else None,
            "settings": result.settings.as_dict(),
            "warnings": result.warnings,
            "seconds_for_call": round(result.seconds, 3),
        }
        if image is None:
            sidecar["provenance"] = {"c2pa": "not signed: image withheld"}
            (out_dir / f"{stem}.withheld.json").write_text(
                json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n"
            )
            continue
        png = out_dir / f"{stem}.png"
        png.write_bytes(_png_bytes(result, index, image, keys_dir, png.name))
        sidecar["image"] = png.name
        sidecar["provenance"] = {
            "watermark": item.as_dict()["watermark"] if item else None,
            "c2pa": result.c2pa_status,
        }
        (out_dir / f"{stem}.json").write_text(json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")
        paths.append(png)
    return paths

"""SLD speed: diffusers' deprecated ``StableDiffusionPipelineSafe`` vs safelatent, same process, same run.

Stable Diffusion 1.5's exact architecture with random weights (``bench/random_sd15.py``; the FLOPs are
those of the trained model), PNDM (SD 1.5's scheduler), CFG 7.5. Rows: plain CFG and SLD medium, 1 and 8
images per prompt. Columns: diffusers (``StableDiffusionPipeline`` / ``StableDiffusionPipelineSafe``
with ``SafetyConfig.MEDIUM``), safelatent eager, safelatent fast path (``torch.compile``
``reduce-overhead`` = CUDA graphs, channels-last). Each cell: median seconds per image over ``--repeats``
timed calls after one warm-up call (the fast path's first call per shape is its compile time, reported
separately), images/s, peak GPU memory.

Numerics, on the same seed (SLD medium, 1 image): fast path vs eager, fp16 eager vs an fp32 eager
reference, and diffusers' safe pipeline vs safelatent eager (the oracle) — max and mean absolute pixel
difference on a 0–1 scale. SLD mask flip rate: the fraction of elements of SLD's mask ``ε_p − ε_S < λ``
(and of the scale μ) that differ when computed in the model's fp16 instead of float32, over all steps of
one run.

    python bench/sld_speed.py                       # CUDA: 512², 50 steps, fp16
    python bench/sld_speed.py --device cpu --tiny   # smoke run: reduced widths, 64², 10 steps

Writes ``sld_speed.json`` and ``sld_speed.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from random_sd15 import build_components

from safelatent.api import Pipeline
from safelatent.sampling.fast import FastPathConfig
from safelatent.sampling.guidance import SafeLatentGuidance
from safelatent.sampling.sld_presets import DEFAULT_SAFETY_CONCEPT, get_sld_preset

PROMPT = "a photograph of an astronaut riding a horse on the moon"
I2P_IMAGES = 47_030
REFERENCE = {  # ../shared/reference/2026-11-22-h100-diffusers-baseline.json (H100, torch 2.11, fp16)
    ("plain", 1): 1.6633,
    ("sld", 1): 1.6021,
    ("plain", 8): 0.3778,
    ("sld", 8): 0.5279,
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def diffusers_pipelines(components):
    """diffusers' plain and (deprecated) safe pipelines over the same module objects."""
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers.pipelines.deprecated.stable_diffusion_safe import (
            SafetyConfig,
            StableDiffusionPipelineSafe,
        )
    parts = {
        "unet": components.unet,
        "vae": components.vae,
        "text_encoder": components.text_encoder,
        "tokenizer": components.tokenizer,
        "scheduler": components.scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = StableDiffusionPipeline(**parts, image_encoder=None)
        safe = StableDiffusionPipelineSafe(**parts)
    for pipe in (plain, safe):
        pipe.set_progress_bar_config(disable=True)
    return plain, safe, SafetyConfig.MEDIUM


@dataclass
class Setup:
    device: str
    size: int
    steps: int
    seed: int = 1


def run_diffusers(pipes, guidance: str, n: int, setup: Setup) -> np.ndarray:
    plain, safe, medium = pipes
    generator = torch.Generator("cpu").manual_seed(setup.seed)
    common = {
        "num_images_per_prompt": n,
        "num_inference_steps": setup.steps,
        "guidance_scale": 7.5,
        "generator": generator,
        "height": setup.size,
        "width": setup.size,
        "output_type": "np",
    }
    out = safe(PROMPT, **common, **medium) if guidance == "sld" else plain(PROMPT, **common)
    return np.asarray(out.images)


def run_safelatent(pipe: Pipeline, guidance: str, n: int, setup: Setup) -> np.ndarray:
    result = pipe.generate(
        PROMPT,
        num_images_per_prompt=n,
        num_inference_steps=setup.steps,
        guidance_scale=7.5,
        sld="medium" if guidance == "sld" else None,
        seed=setup.seed,
        width=setup.size,
        height=setup.size,
        return_pixels=True,
    )
    return result.pixels


def clip_l14_seconds_per_image(device: str, dtype, batch: int = 64, repeats: int = 5) -> float:
    """Q16's image side: CLIP ViT-L/14 (random weights, its exact architecture) encoding 224² images."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
        projection_dim=768,
    )
    model = CLIPVisionModelWithProjection(config).to(device=device, dtype=dtype).eval()
    pixels = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    with torch.inference_mode():
        model(pixel_values=pixels)
        times = []
        for _ in range(repeats):
            _sync(device)
            started = time.perf_counter()
            model(pixel_values=pixels)
            _sync(device)
            times.append(time.perf_counter() - started)
    return statistics.median(times) / batch


def time_calls(call, repeats: int, device: str) -> tuple[float, float, float | None, np.ndarray]:
    """(first call seconds, median of ``repeats`` later calls, peak GiB, images of the last call)."""
    _reset_peak(device)
    _sync(device)
    started = time.perf_counter()
    images = call()
    _sync(device)
    first = time.perf_counter() - started
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        images = call()
        _sync(device)
        times.append(time.perf_counter() - started)
    return first, statistics.median(times), _peak_gib(device), images


def diff(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean())}


class RecordingGuidance:
    """SLD medium that keeps every step's (ε_∅, ε_p, ε_S) for the mask flip-rate measurement."""

    def __init__(self, inner: SafeLatentGuidance) -> None:
        self.inner = inner
        self.needs_uncond = inner.needs_uncond
        self.concepts = inner.concepts
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def start(self, num_inference_steps):
        return self.inner.start(num_inference_steps)

    def __call__(self, preds, state, step_index):
        self.records.append((preds.text.clone(), preds.concepts[0].clone()))
        return self.inner(preds, state, step_index)

    def describe(self):
        return self.inner.describe()


def mask_flip_rate(pipe: Pipeline, setup: Setup) -> dict[str, float]:
    """Run SLD medium eagerly in the model dtype, then compare SLD's mask and scale computed from the same
    predictions in that dtype vs float32."""
    config = get_sld_preset("medium")
    recorder = RecordingGuidance(SafeLatentGuidance(7.5, config, DEFAULT_SAFETY_CONCEPT))
    original = pipe._guidance
    pipe._guidance = lambda *args, **kwargs: recorder
    try:
        pipe.generate(PROMPT, num_inference_steps=setup.steps, seed=setup.seed, width=setup.size,
                      height=setup.size, sld="medium")  # fmt: skip
    finally:
        pipe._guidance = original
    flips = scale_changes = total = 0
    for text, concept in recorder.records:
        low = text - concept  # model dtype
        high = text.float() - concept.float()
        mask_low, mask_high = low < config.threshold, high < config.threshold
        flips += int((mask_low != mask_high).sum())
        scale_low = torch.clamp(low.abs() * config.guidance_scale, max=1.0).float()
        scale_high = torch.clamp(high.abs() * config.guidance_scale, max=1.0)
        scale_changes += int(((scale_low - scale_high).abs() > 1e-3).sum())
        total += text.numel()
    return {
        "dtype": str(recorder.records[0][0].dtype),
        "mask_flip_rate": flips / total,
        "scale_change_rate": scale_changes / total,
        "elements": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="reduced widths, 64², 10 steps (CPU smoke run)")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", default="sld-1,sld-8,plain-1,plain-8", help="which rows, in order")
    parser.add_argument("--no-compile", action="store_true", help="skip the fast-path column")
    parser.add_argument("--compile-mode", default="reduce-overhead")
    parser.add_argument("--no-numerics", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    device = args.device
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    setup = Setup(device, args.size or (64 if args.tiny else 512), args.steps or (10 if args.tiny else 50))
    rows = [(r.split("-")[0], int(r.split("-")[1])) for r in args.rows.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)

    reference32 = build_components("tiny" if args.tiny else "full", scheduler="PNDMScheduler")
    components = copy.deepcopy(reference32)
    for part in (components.unet, components.vae, components.text_encoder):
        part.to(device=device, dtype=dtype)
    info = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "size": setup.size,
        "steps": setup.steps,
        "tiny": args.tiny,
        "compile_mode": args.compile_mode,
        "rows": {},
    }
    out_json = args.out / "sld_speed.json"

    def save():
        out_json.write_text(json.dumps(info, indent=1))

    pipes = diffusers_pipelines(components)
    # the `evaluation` policy: no output classifiers, watermark or audit row, like diffusers' pipelines
    # with safety_checker=None (bench/security_overhead.py measures those layers)
    ours = Pipeline(components, policy="evaluation")
    images: dict[tuple, np.ndarray] = {}
    columns = [("diffusers", None), ("eager", None)] + ([] if args.no_compile else [("fast", None)])
    for column, _ in columns:
        if column == "fast":
            ours.enable_fast_path(FastPathConfig(mode=args.compile_mode))
        for guidance, n in rows:
            if column == "diffusers":
                call = lambda g=guidance, k=n: run_diffusers(pipes, g, k, setup)  # noqa: E731
            else:
                call = lambda g=guidance, k=n: run_safelatent(ours, g, k, setup)  # noqa: E731
            first, median, peak, imgs = time_calls(call, args.repeats, device)
            images[(column, guidance, n)] = imgs
            cell = {
                "s_per_image": median / n,
                "images_per_s": n / median,
                "first_call_s": first,
                "peak_gib": peak,
            }
            info["rows"].setdefault(f"{guidance}-{n}", {})[column] = cell
            print(f"{column:9s} {guidance:5s} n={n}: {median / n:.4f} s/image (first call {first:.1f} s)",
                  flush=True)  # fmt: skip
            save()

    if not args.tiny:
        info["clip_l14_s_per_image"] = clip_l14_seconds_per_image(device, dtype)
        save()

    if not args.no_numerics:
        numerics = {}
        if ("eager", "sld", 1) in images and ("diffusers", "sld", 1) in images:
            numerics["diffusers_vs_eager"] = diff(
                images[("diffusers", "sld", 1)], images[("eager", "sld", 1)]
            )
        if ("fast", "sld", 1) in images:
            numerics["fast_vs_eager"] = diff(images[("fast", "sld", 1)], images[("eager", "sld", 1)])
        ours.disable_fast_path()
        numerics["mask_precision"] = mask_flip_rate(ours, setup)
        if dtype != torch.float32:
            del ours, pipes, components
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            for part in (reference32.unet, reference32.vae, reference32.text_encoder):
                part.to(device=device)
            reference = run_safelatent(Pipeline(reference32, policy="evaluation"), "sld", 1, setup)
            numerics["eager_fp16_vs_fp32"] = diff(images[("eager", "sld", 1)], reference)
            if ("fast", "sld", 1) in images:
                numerics["fast_fp16_vs_fp32"] = diff(images[("fast", "sld", 1)], reference)
        info["numerics"] = numerics
        save()

    report(info, args.out)


def report(info: dict, out: Path) -> None:
    lines = [
        f"# SLD speed — {info['device']}, torch {info['torch']}, {info['dtype']}, {info['size']}², "
        f"{info['steps']} steps{' (tiny widths)' if info['tiny'] else ''}",
        "",
        "| row | diffusers s/img | eager s/img | fast s/img | fast ÷ diffusers | fast img/s"
        " | first call (compile) s | peak GiB (diffusers / fast) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, cells in info["rows"].items():
        d, e, f = cells.get("diffusers"), cells.get("eager"), cells.get("fast")

        def s(cell, key="s_per_image", fmt="{:.3f}"):
            return "—" if not cell or cell.get(key) is None else fmt.format(cell[key])

        speedup = f"{d['s_per_image'] / f['s_per_image']:.2f}×" if d and f else "—"
        peaks = f"{s(d, 'peak_gib', '{:.2f}')} / {s(f, 'peak_gib', '{:.2f}')}"
        lines.append(
            f"| {row} | {s(d)} | {s(e)} | {s(f)} | {speedup} | {s(f, 'images_per_s', '{:.2f}')} |"
            f" {s(f, 'first_call_s', '{:.1f}')} | {peaks} |"
        )
    best = info["rows"].get("sld-8", {})
    fastest = best.get("fast") or best.get("eager")
    if fastest:
        per_image = fastest["s_per_image"] + info.get("clip_l14_s_per_image", 0.0)
        hours = per_image * I2P_IMAGES / 3600
        clip = info.get("clip_l14_s_per_image")
        lines += [
            "",
            f"Full I2P ({I2P_IMAGES:,} images, SLD medium) at the sld-8 rate"
            + (f" + Q16's CLIP ViT-L/14 ({clip * 1000:.1f} ms/image)" if clip else "")
            + f": {hours:.2f} h.",
        ]
    if "numerics" in info:
        lines += ["", "Numerics (SLD medium, 1 image, same seed; pixels on 0–1):", ""]
        for name, value in info["numerics"].items():
            lines.append(f"- {name}: {json.dumps(value)}")
    text = "\n".join(lines) + "\n"
    (out / "sld_speed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())

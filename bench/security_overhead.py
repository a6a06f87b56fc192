"""What the security layers cost on a toy request, CPU: all layers on vs off, and each layer alone.

    python bench/security_overhead.py [--repeats 7] [--threads 2] [--images 4] [--steps 30]

One request = ``generate`` + ``save`` (PNG files), the model already loaded, same prompts and seeds.

* **off**: the ``evaluation`` policy — the prompt policy still runs (it cannot be switched off), no output
  classifiers, no watermark, no C2PA, no audit row;
* **on**: every layer — the prompt policy, NudeNet *and* the toy classifier (marker → blur), the invisible
  watermark, C2PA signing of every file (keys from ``safelatent keys init`` in a temporary folder) and an
  audit row (temporary SQLite file).

Rows at the toy model's own 32×32 (the watermark does not fit: recorded as "not marked") and at 256×256
(the smallest size the watermark takes; fewer steps, the toy model is not trained for it). Then the
layers alone on the 256×256 images: median milliseconds per request for each. Figures go to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch

from safelatent import api
from safelatent.safety import watermark
from safelatent.safety.c2pa_manifest import GenerationRecord, sign_bytes
from safelatent.safety.layers import SecurityLayers, new_request_id
from safelatent.safety.policy_file import load_policy, parse_policy
from safelatent.safety.prompt_policy import check_prompt
from safelatent.toy import world


def all_layers_policy(tmp: Path):
    """Every layer on, keys and audit log in ``tmp``."""
    from safelatent.safety.keys import init_keys

    init_keys(tmp / "keys")
    text = f"""
name = "all-layers"
[outputs]
classifiers = ["nudenet", "toy"]
[outputs.actions.nudity]
action = "blur"
[outputs.actions.marker]
action = "blur"
[provenance]
watermark = true
c2pa = true
keys_dir = "{tmp / "keys"}"
[audit]
enabled = true
path = "{tmp / "audit.sqlite3"}"
"""
    return parse_policy(text, source="all-layers.toml")


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm: loads NudeNet's ONNX session, opens the audit database
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def fmt(times: list[float]) -> str:
    ms = [t * 1e3 for t in times]
    return f"median {statistics.median(ms):9.2f} ms (min {min(ms):.2f}, max {max(ms):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=4, help="images per request")
    parser.add_argument("--steps", type=int, default=30, help="DDIM steps at 32×32 (256×256 uses 4)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = api.load(None, device="cpu")
    prompts = [world.prompt_for("circle", "red", "white"), world.prompt_for("square", "blue", "gray")]
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        policies = {"off": load_policy("evaluation"), "on": all_layers_policy(tmp)}
        images = {}
        print(f"{args.images} images per request, {args.threads} threads, {args.repeats} repeats, after load")
        for size, steps in ((32, args.steps), (256, 4)):
            medians = {}
            for name, policy in policies.items():
                counter = iter(range(10**6))

                def request(policy=policy, size=size, steps=steps, name=name, counter=counter):
                    result = pipe.generate(
                        prompts,
                        num_images_per_prompt=args.images // len(prompts),
                        num_inference_steps=steps,
                        guidance_scale=3.0,
                        scheduler="ddim",
                        seed=1,
                        width=size,
                        height=size,
                        policy=policy,
                    )
                    result.save(tmp / f"out-{name}-{size}-{next(counter)}")
                    images[size] = result.images

                times = timed(request, args.repeats)
                medians[name] = statistics.median(times)
                print(f"{size:3d}×{size:<3d} {steps:2d} steps  layers {name:3s}: {fmt(times)}")
            extra = medians["on"] - medians["off"]
            print(
                f"{size:3d}×{size:<3d} overhead: +{extra * 1e3:.1f} ms per request"
                f" (+{extra / medians['off']:.1%})"
            )

        layers = SecurityLayers(policies["on"])
        raw = [im for im in images[256] if im is not None]
        print(f"layers alone, {len(raw)} images of 256×256:")
        rows = {
            "prompt policy (2 prompts)": lambda: [check_prompt(p, policies["on"]) for p in prompts],
            "classifiers: nudenet": lambda: layers.classifiers[0].scores(raw),
            "classifiers: toy": lambda: layers.classifiers[1].scores(raw),
            "classifiers + actions + watermark": lambda: layers.process_outputs(
                raw, request_id=new_request_id()
            ),
            "audit row": lambda: layers.record(
                request_id=new_request_id(),
                prompts=prompts,
                decisions=[check_prompt(p, policies["on"]) for p in prompts],
                settings={},
                model_hash=pipe.components.model_hash,
            ),
        }
        rows["watermark embed"] = lambda: [watermark.embed(im, "tag") for im in raw]
        pngs = []
        for im in raw:
            buffer = io.BytesIO()
            im.save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        record = GenerationRecord(model_hash=pipe.components.model_hash)
        rows["C2PA sign (PNG bytes)"] = lambda: [sign_bytes(d, record, keys_dir=tmp / "keys") for d in pngs]
        for label, fn in rows.items():
            print(f"  {label:36s} {fmt(timed(fn, args.repeats))}")


if __name__ == "__main__":
    main()

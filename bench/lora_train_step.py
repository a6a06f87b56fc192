"""One LoRA training step on Stable Diffusion 1.5's architecture: safelatent's trainer vs diffusers'
``train_text_to_image_lora.py`` recipe, on the same device in one run.

Both train a rank-4 peft ``LoraConfig`` (``lora_alpha`` 4, gaussian init) on the UNet's ``to_k``,
``to_q``, ``to_v``, ``to_out.0`` with AdamW (lr 1e-4, gradient clipping 1.0, constant schedule), with the
frozen UNet, VAE and text encoder in the weight dtype (fp16 under fp16 mixed precision on CUDA, fp32 on
the CPU) and the LoRA weights in fp32; every step VAE-encodes the images and text-encodes the captions.
The recipe's step is reproduced line for line from the diffusers example (peft version) on tensors
already in memory; safelatent's is ``train_lora`` itself on a folder of PNGs (so its figure includes
reading and cropping the images). Weights are random, built from the shipped SD 1.5 configs: the FLOPs
and memory are those of the trained model.

Each (trainer, batch size) runs in its own subprocess, so peak memory is its own: CUDA
``max_memory_allocated``, or on the CPU the process's peak RSS. Writes ``lora_train_step.md`` / ``.json``
to ``--out``::

    python bench/lora_train_step.py --device cuda --resolution 512 --steps 30
    python bench/lora_train_step.py --device cpu --widths tiny --resolution 64 --steps 3   # smoke test
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from random_sd15 import build_components

TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
RANK = 4
LR = 1e-4
CAPTION = "a photograph of an astronaut riding a horse"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak(device: str) -> float:
    """Peak memory in GiB: CUDA allocations, or this process's peak RSS on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_recipe(args) -> list[float]:
    """diffusers' train_text_to_image_lora.py (peft version), its set-up and step; step end times."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    c = build_components(args.widths)
    unet, vae, text_encoder, noise_scheduler = c.unet, c.vae, c.text_encoder, c.scheduler
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    unet_lora_config = LoraConfig(
        r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS
    )
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    unet.add_adapter(unet_lora_config)
    if args.mixed_precision == "fp16":
        cast_training_params(unet, dtype=torch.float32)
    lora_layers = list(filter(lambda p: p.requires_grad, unet.parameters()))
    optimizer = torch.optim.AdamW(lora_layers, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-08)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=1000)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ids = c.tokenizer(
        [CAPTION] * args.batch_size, max_length=c.tokenizer.model_max_length, padding="max_length",
        truncation=True, return_tensors="pt",
    ).input_ids.to(accelerator.device)  # fmt: skip
    pixels = torch.rand(args.batch_size, 3, args.resolution, args.resolution) * 2 - 1
    batch = {"pixel_values": pixels.to(accelerator.device), "input_ids": ids}
    unet.train()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    ends = []
    for _ in range(args.warmup + args.steps):
        latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device
        )
        timesteps = timesteps.long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
        target = noise
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        avg_loss = accelerator.gather(loss.repeat(args.batch_size)).mean()
        _ = avg_loss.item()
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(lora_layers, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        _sync(args.device)
        ends.append(time.perf_counter())
    return ends


def run_safelatent(args) -> list[float]:
    """safelatent's ``train_lora`` with the same settings; step end times (``on_step``)."""
    from PIL import Image

    from safelatent.train.config import LoraTrainConfig
    from safelatent.train.lora import train_lora

    components = build_components(args.widths)
    ends: list[float] = []

    def on_step(step, loss):
        _sync(args.device)
        ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        rng = np.random.default_rng(0)
        for i in range(max(8, args.batch_size)):
            pixels = rng.integers(0, 256, (args.resolution, args.resolution, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(data / f"{i}.png")
            (data / f"{i}.txt").write_text(CAPTION)
        config = LoraTrainConfig(
            data_dir=str(data),
            out_dir=str(Path(tmp) / "out"),
            resolution=args.resolution,
            bucketing=False,
            rank=RANK,
            alpha=float(RANK),
            unet_targets=list(TARGETS),
            steps=args.warmup + args.steps,
            batch_size=args.batch_size,
            learning_rate=LR,
            lr_scheduler="constant",
            optimizer="adamw",
            min_snr_gamma=None,
            mixed_precision=args.mixed_precision,
            device="cuda" if args.device.startswith("cuda") else "cpu",
            checkpoint_steps=0,
            progress=False,
        )
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        train_lora(config, log=lambda *_: None, components=components, on_step=on_step)
    return ends


def worker(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    ends = (run_recipe if args.worker == "recipe" else run_safelatent)(args)
    timed = ends[args.warmup - 1 :] if args.warmup else ends
    seconds = timed[-1] - timed[0]
    steps = len(timed) - 1
    result = {
        "trainer": args.worker,
        "batch_size": args.batch_size,
        "it_per_s": steps / seconds if seconds > 0 else float("nan"),
        "seconds_per_step": seconds / steps if steps else float("nan"),
        "peak_gib": _peak(args.device),
    }
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=None, help="default 512 on CUDA, 256 on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--widths", choices=("full", "tiny"), default="full")
    parser.add_argument("--mixed-precision", default=None, help="default fp16 on CUDA, no on the CPU")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--worker", choices=("recipe", "safelatent"), help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.resolution = args.resolution or (512 if cuda else 256)
    args.steps = args.steps or (30 if cuda else 3)
    args.mixed_precision = args.mixed_precision or ("fp16" if cuda else "no")
    args.warmup = max(1, args.warmup)
    if args.worker:
        worker(args)
        return
    rows = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        for trainer in ("recipe", "safelatent"):
            command = [
                sys.executable, __file__, "--worker", trainer, "--batch-size", str(batch_size),
                "--device", args.device, "--resolution", str(args.resolution), "--steps", str(args.steps),
                "--warmup", str(args.warmup), "--widths", args.widths,
                "--mixed-precision", args.mixed_precision,
            ] + (["--threads", str(args.threads)] if args.threads else [])  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                raise SystemExit(f"{trainer} bs {batch_size} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(lines[-1][len("RESULT ") :]))
            print(json.dumps(rows[-1]), flush=True)
    device = (
        torch.cuda.get_device_name() if cuda else f"CPU ({args.threads or torch.get_num_threads()} threads)"
    )
    head = (
        f"SD 1.5 architecture ({args.widths} widths, random weights), {args.resolution}×{args.resolution}, "
        f"mixed precision {args.mixed_precision}, {args.steps} timed steps after {args.warmup} warm-up, "
        f"{device}, torch {torch.__version__}\n\n"
        "| trainer | batch | it/s | s/step | peak GiB |\n|---|---:|---:|---:|---:|"
    )
    lines = [
        f"| {r['trainer']} | {r['batch_size']} | {r['it_per_s']:.3f} | {r['seconds_per_step']:.3f} | "
        f"{r['peak_gib']:.2f} |"
        for r in rows
    ]
    table = "\n".join([head, *lines])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora_train_step.md").write_text(table + "\n")
    record = {"device": device, "resolution": args.resolution, "widths": args.widths, "rows": rows}
    (args.out / "lora_train_step.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()

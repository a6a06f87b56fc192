"""UNet forward variants on a GPU: which layout / attention kernel / projection fusion is fastest.

SD 1.5's exact UNet with random weights (``bench/random_sd15.py``), fp16, 64×64 latents, 77 text tokens.
Each variant is applied cumulatively or alone (see ``VARIANTS``) and timed eagerly (CUDA events, median
of ``--repeats`` calls after 3 warm-ups) at each ``--batches`` size; ``--compile`` also times the winner
under ``torch.compile(mode="reduce-overhead")`` (first call = compile time).

    python bench/unet_variants.py --batches 3,24 --out bench/results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from random_sd15 import build_components

GFLOP_PER_IMAGE = 803.27  # ../shared/reference: SD 1.5 UNet at 64×64 latents, one call


def _attention(backend: str | None):
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, backend)])


def time_forward(unet, batch: int, repeats: int, backend: str | None) -> float:
    """Median milliseconds per forward at ``batch``."""
    sample = torch.randn(batch, 4, 64, 64, device="cuda", dtype=torch.float16)
    if unet_is_channels_last(unet):
        sample = sample.contiguous(memory_format=torch.channels_last)
    text = torch.randn(batch, 77, 768, device="cuda", dtype=torch.float16)
    t = torch.tensor(500, device="cuda")
    times = []
    with torch.inference_mode(), _attention(backend):
        for _ in range(3):
            unet(sample, t, encoder_hidden_states=text, return_dict=False)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            unet(sample, t, encoder_hidden_states=text, return_dict=False)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def unet_is_channels_last(unet) -> bool:
    return unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="3,24")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    unet = build_components("full").unet.to("cuda", torch.float16).eval()
    results: dict[str, dict[int, float]] = {}

    def record(name: str, backend: str | None = None) -> None:
        results[name] = {}
        for batch in batches:
            ms = time_forward(unet, batch, args.repeats, backend)
            results[name][batch] = ms
            tflops = GFLOP_PER_IMAGE * batch / ms  # GFLOP/ms = TFLOP/s
            print(f"{name:34s} batch {batch:3d}: {ms:7.2f} ms  {tflops:6.1f} TFLOP/s", flush=True)

    record("eager")
    for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        try:
            record(f"eager sdpa={backend}", backend)
        except RuntimeError as error:  # backend not available for these shapes
            print(f"{backend}: {str(error).splitlines()[0]}")
    unet.to(memory_format=torch.channels_last)
    record("channels_last")
    record("channels_last sdpa=CUDNN", "CUDNN_ATTENTION")
    unet.fuse_qkv_projections()
    record("channels_last fused_qkv")
    record("channels_last fused_qkv sdpa=CUDNN", "CUDNN_ATTENTION")
    if args.compile:
        import torch._inductor.config as inductor

        inductor.conv_1x1_as_mm = True
        compiled = torch.compile(unet, mode="reduce-overhead", dynamic=False)
        for batch in batches:
            started = time.perf_counter()
            time_forward(compiled, batch, 1, None)
            first = time.perf_counter() - started
            ms = time_forward(compiled, batch, args.repeats, None)
            results.setdefault("compiled fused_qkv channels_last", {})[batch] = ms
            print(f"compiled fused_qkv channels_last batch {batch}: {ms:.2f} ms (first {first:.0f} s)")
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ms": results}
    (args.out / "unet_variants.json").write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()

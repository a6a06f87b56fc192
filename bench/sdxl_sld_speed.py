"""SDXL: SLD vs plain CFG at 1024², seconds per image, in the same process — plus diffusers'
``StableDiffusionXLPipeline`` on the same modules as the reference.

SDXL base's exact architecture with random weights, built from the configs that ship in the package
(``models/configs/sdxl``; the FLOPs and memory are those of the trained model), fp16 with the VAE in fp32
(SDXL's ``force_upcast``), Euler (SDXL's scheduler), CFG 7.5. Rows: diffusers plain, safelatent plain,
safelatent SLD medium (three branches per UNet call instead of two), at ``--images`` images per call;
each cell the median over ``--repeats`` timed calls after one warm-up call, with peak GPU memory. A
numerics row compares safelatent plain with diffusers on the same seed (max/mean absolute pixel
difference, 0–1 scale).

    python bench/sdxl_sld_speed.py                         # CUDA: 1024², 50 steps, fp16
    python bench/sdxl_sld_speed.py --device cpu --tiny     # smoke run: reduced widths, 64², 4 steps

Writes ``sdxl_sld_speed.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch
from sld_speed import time_calls

from safelatent.api import Pipeline
from safelatent.models.components import StableDiffusionComponents

PROMPT = "a photograph of an astronaut riding a horse on the moon"

#: ``--tiny``: SDXL's block types, three levels and sgm layout with reduced widths (smoke runs only)
TINY = {
    "unet": {"block_out_channels": [32, 64, 64], "attention_head_dim": [2, 4, 4],
             "transformer_layers_per_block": [1, 1, 2], "cross_attention_dim": 64,
             "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 80, "sample_size": 8},
    "vae": {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                     "num_hidden_layers": 2, "projection_dim": 32},
}  # fmt: skip
TINY["text_encoder_2"] = TINY["text_encoder"]


def build_sdxl(tiny: bool, device: str, dtype: torch.dtype) -> StableDiffusionComponents:
    """Random-weight SDXL base components from the shipped configs (seed 0)."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from safelatent.models.loading import vae_dtype
    from safelatent.models.shipped import load_component_config
    from safelatent.models.tokenizer import load_clip_tokenizer

    def config(name):
        values = {k: v for k, v in load_component_config("sdxl", name).items() if not k.startswith("_")}
        values.update(TINY.get(name, {}) if tiny else {})
        return {k: v for k, v in values.items() if k not in ("architectures", "torch_dtype")}

    cast = torch.nn.Module.to  # diffusers' ModelMixin.to warns about fp32-pinned modules it has none of
    torch.manual_seed(0)
    with torch.device(device):
        unet = cast(UNet2DConditionModel(**config("unet")), dtype)
        vae = AutoencoderKL(**config("vae"))
        cast(vae, vae_dtype(vae, dtype, "sdxl"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**config("text_encoder"))).to(dtype)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder_2"))).to(dtype)
    for model in (unet, vae, text_encoder, text_encoder_2):
        model.eval().requires_grad_(False)
    scheduler = load_component_config("sdxl", "scheduler")
    return StableDiffusionComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        scheduler=getattr(diffusers, scheduler["_class_name"]).from_config(scheduler),
        architecture="sdxl",
        source=f"random-sdxl-{'tiny' if tiny else 'full'}",
        model_hash="random",
        text_encoder_2=text_encoder_2,
        tokenizer_2=load_clip_tokenizer(pad_token="!"),
        force_zeros_for_empty_prompt=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="reduced widths (CPU smoke run)")
    parser.add_argument("--size", type=int, default=None, help="default: 1024, or 64 with --tiny")
    parser.add_argument("--steps", type=int, default=None, help="default: 50, or 4 with --tiny")
    parser.add_argument("--images", type=int, default=1, help="images per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/gpu"))
    args = parser.parse_args()
    size = args.size or (64 if args.tiny else 1024)
    steps = args.steps or (4 if args.tiny else 50)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    components = build_sdxl(args.tiny, args.device, dtype)
    pipe = Pipeline(components, policy="evaluation")

    from diffusers import StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        unet=components.unet,
        scheduler=components.scheduler,
        add_watermarker=False,
    )
    reference.set_progress_bar_config(disable=True)

    def ours(sld):
        return lambda: pipe.generate(
            PROMPT, num_images_per_prompt=args.images, num_inference_steps=steps, guidance_scale=7.5,
            sld=sld, seed=1, width=size, height=size, return_pixels=True,
        ).pixels  # fmt: skip

    def theirs():
        return reference(
            PROMPT, num_images_per_prompt=args.images, num_inference_steps=steps, guidance_scale=7.5,
            height=size, width=size, generator=torch.Generator("cpu").manual_seed(1), output_type="np",
        ).images  # fmt: skip

    rows = {}
    for name, call in (
        ("diffusers plain", theirs),
        ("safelatent plain", ours(None)),
        ("safelatent SLD medium", ours("medium")),
    ):
        _, median, peak, images = time_calls(call, args.repeats, args.device)  # first call: warm-up
        rows[name] = {"seconds_per_call": median, "peak_gib": peak, "images": images}
    difference = np.abs(
        rows["safelatent plain"]["images"].astype(np.float64) - np.asarray(rows["diffusers plain"]["images"])
    )
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__,
        "widths": "tiny" if args.tiny else "full",
        "size": size,
        "steps": steps,
        "images_per_call": args.images,
        "dtype": str(dtype),
        "rows": {
            name: {
                "seconds_per_image": row["seconds_per_call"] / args.images,
                "peak_gib": row["peak_gib"],
            }
            for name, row in rows.items()
        },
        "sld_over_plain": rows["safelatent SLD medium"]["seconds_per_call"]
        / rows["safelatent plain"]["seconds_per_call"],
        "plain_vs_diffusers": {"max_abs": float(difference.max()), "mean_abs": float(difference.mean())},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sdxl_sld_speed.json").write_text(json.dumps(result, indent=2))
    for name, row in result["rows"].items():
        peak = f", peak {row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else ""
        print(f"{name:24s} {row['seconds_per_image']:.3f} s/image{peak}")
    numerics = result["plain_vs_diffusers"]
    print(f"SLD / plain: {result['sld_over_plain']:.2f}×; safelatent vs diffusers plain: {numerics}")


if __name__ == "__main__":
    main()

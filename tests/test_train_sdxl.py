"""Adapters on Stable Diffusion XL: LoRA training with SDXL's size/crop micro-conditioning, and erasure.

On reduced-width random SDXL components: every UNet call in training carries the pooled embedding of the
second text encoder and the per-example time ids ``(h_orig, w_orig, c_top, c_left, h_bucket, w_bucket)``
(Podell et al. 2023, §2.2) computed from each image's own size and crop; the written adapters load into
the SDXL pipeline and change its images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers.lora_training import tiny_config, write_png
from helpers.tiny_sd import build_tiny_sd
from safelatent.api import Pipeline
from safelatent.errors import InvalidArgumentError
from safelatent.models.components import StableDiffusionComponents
from safelatent.train import data as D
from safelatent.train.config import EraseTrainConfig
from safelatent.train.erase import train_erase
from safelatent.train.lora import train_lora
from safelatent.train.text import TrainingText

#: (width, height) of the training images; at resolution 64 each covers the 64×64 bucket
SIZES = [(96, 64), (64, 80), (128, 128)]


def _components(seed: int = 0) -> StableDiffusionComponents:
    return StableDiffusionComponents(
        **build_tiny_sd("sdxl", seed=seed),
        architecture="sdxl",
        source="tiny-sdxl",
        model_hash="0000000000",
        force_zeros_for_empty_prompt=True,
    )


def _write_data(data):
    """One captioned PNG per size in :data:`SIZES`."""
    data.mkdir()
    for i, (w, h) in enumerate(SIZES):
        write_png(data / f"{i}.png", w, h, seed=i)
        (data / f"{i}.txt").write_text(f"a picture number {i}")
    return data


def _record_unet_calls(unet) -> list[dict]:
    calls: list[dict] = []

    def hook(module, args, kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        calls.append({k: v.detach().clone() for k, v in added.items()})

    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def _images(components, loras=()) -> np.ndarray:
    pipe = Pipeline(components)
    if loras:
        pipe.set_loras(list(loras))
    return pipe.generate(
        "sks a lighthouse", num_inference_steps=3, seed=5, width=64, height=64, return_pixels=True
    ).pixels


def test_micro_conditioning_of_crops_and_flips():
    image = Image.new("RGB", (300, 200))
    pixels, ids = D.prepare_pixels_placed(image, (128, 128), crop="center", flip=False)
    assert pixels.shape == (128, 128, 3)
    # covered to 192×128, centre crop at x = 32: (h_orig, w_orig, top, left, h, w)
    assert ids == [200, 300, 0, 32, 128, 128]
    generator = torch.Generator().manual_seed(0)
    _, ids = D.prepare_pixels_placed(image, (128, 128), crop="random", flip=True, generator=generator)
    left = int(torch.randint(0, 65, (1,), generator=torch.Generator().manual_seed(0)))
    assert ids == [200, 300, 0, 192 - left - 128, 128, 128]  # counted from the mirrored side
    example = D.Example(path=None, caption="", width=300, height=200, bucket=(128, 128))
    assert D.centre_crop_conditioning(example, flip=False) == [200, 300, 0, 32, 128, 128]


@pytest.mark.parametrize("cache_latents", [False, True], ids=["pixels", "latent-cache"])
def test_lora_training_passes_pooled_text_and_time_ids(tmp_path, cache_latents):
    data = _write_data(tmp_path / "data")
    components = _components()
    before = _images(components)
    calls = _record_unet_calls(components.unet)
    config = tiny_config(
        data, tmp_path / "out", steps=3, batch_size=3, resolution=64, crop="center",
        cache_latents=cache_latents, export_kohya=True, learning_rate=5e-2,
    )  # fmt: skip
    summary = train_lora(config, components=components)
    assert len(calls) == 3  # one UNet call per step, each with SDXL's added conditions
    expected = sorted(
        D.centre_crop_conditioning(D.Example(None, "", w, h, (64, 64)), flip=False) for w, h in SIZES
    )
    for call in calls:
        assert sorted(call["time_ids"].int().tolist()) == expected
        assert call["text_embeds"].shape == (3, 32)
    text = TrainingText(components, torch.device("cpu"), trained=False)
    _, pooled = text.encode(["sks, a picture number 0"])
    assert any(torch.allclose(row, pooled[0], atol=1e-5) for row in calls[0]["text_embeds"])
    lora = load_file(summary["lora_file"])
    assert lora and all(k.startswith("unet.") for k in lora)
    kohya = load_file(summary["kohya_file"])
    assert all(k.startswith("lora_unet_") for k in kohya)
    shared = _components()
    adapted = _images(shared, [summary["lora_file"]])
    assert np.abs(adapted - before).max() > 1e-3
    # a second pipeline over the same loaded models: its own adapter names, the same images
    assert np.abs(_images(shared, [summary["kohya_file"]]) - adapted).max() < 1e-5


def test_text_encoder_loras_on_both_sdxl_encoders(tmp_path):
    """``train_text_encoder`` on SDXL trains a LoRA on both text encoders: diffusers' SDXL file layout
    (``text_encoder.`` + ``text_encoder_2.``), kohya's ``lora_te1_``/``lora_te2_``, the same images from
    either, and a resumed run restores both."""
    data = _write_data(tmp_path / "data")
    components = _components()
    before = _images(components)
    settings = {
        "steps": 2, "batch_size": 3, "resolution": 64, "train_text_encoder": True, "export_kohya": True,
        "learning_rate": 5e-2, "checkpoint_steps": 1,
    }  # fmt: skip
    summary = train_lora(tiny_config(data, tmp_path / "out", **settings), components=components)
    keys = load_file(summary["lora_file"]).keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    kohya = load_file(summary["kohya_file"]).keys()
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
    shared = _components()
    adapted = _images(shared, [summary["lora_file"]])
    assert np.abs(adapted - before).max() > 1e-3
    assert np.abs(_images(shared, [summary["kohya_file"]]) - adapted).max() < 1e-5
    resumed = train_lora(
        tiny_config(data, tmp_path / "out", resume=True, **settings), components=_components()
    )
    restored = load_file(resumed["lora_file"])
    for key, value in load_file(summary["lora_file"]).items():
        torch.testing.assert_close(restored[key], value, rtol=0, atol=0, msg=key)


def test_erasure_on_sdxl(tmp_path):
    components = _components()
    before = _images(components)
    calls = _record_unet_calls(components.unet)
    config = EraseTrainConfig(
        out_dir=str(tmp_path / "out"), concept="a lighthouse", preserve=[], steps=2, batch_size=2, rank=2,
        learning_rate=5e-2, trajectories=1, sample_steps=2, resolution=64, checkpoint_steps=0,
        progress=False, seed=1, threads=1,
    )  # fmt: skip
    summary = train_erase(config, components=components)
    pool_calls = calls[:2]  # two DDIM steps of one trajectory: unconditional + concept rows
    for call in pool_calls:
        assert call["time_ids"].int().tolist() == [[64, 64, 0, 0, 64, 64]] * 2
        assert torch.count_nonzero(call["text_embeds"][0]) == 0  # SDXL base's zero unconditional branch
    assert len(calls) == 4 and all(c["text_embeds"].shape[0] == 2 for c in calls[2:])
    keys = load_file(summary["lora_file"]).keys()
    assert keys and all(".attn2." in k for k in keys)
    assert np.abs(_images(_components(), [summary["lora_file"]]) - before).max() > 1e-4


def test_a_wrapped_text_encoder_is_called_through_its_wrapper():
    """After ``accelerate.prepare`` on several GPUs the trained text encoder is a DDP wrapper: it has no
    ``config`` of its own, and must be called as the wrapper so gradients synchronise."""
    components = _components()

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    text = TrainingText(components, torch.device("cpu"), trained=True)
    text.text_encoder = Wrapper(components.text_encoder)
    hidden, pooled = text.encode(["a lighthouse"])
    assert text.text_encoder.calls == 1 and hidden.shape == (1, 77, 64) and pooled.shape == (1, 32)


def test_training_loads_the_base_with_prediction_type_and_vae(tmp_path):
    from diffusers import StableDiffusionPipeline

    from safelatent.train.adapter_run import load_base

    parts = build_tiny_sd("sd2", seed=0)
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None).save_pretrained(
        tmp_path / "sd2"
    )
    parts["vae"].save_pretrained(tmp_path / "vae")
    config = EraseTrainConfig(
        out_dir=str(tmp_path / "out"), concept="a lighthouse", model=str(tmp_path / "sd2"),
        prediction_type="epsilon", vae=str(tmp_path / "vae"),
    )  # fmt: skip
    components = load_base(config, torch.device("cpu"), torch.float32)
    assert components.scheduler.config.prediction_type == "epsilon"  # the folder's says v_prediction
    assert components.extra["vae"] == str(tmp_path / "vae")
    with pytest.raises(InvalidArgumentError, match="prediction_type"):
        train_erase(EraseTrainConfig(out_dir=str(tmp_path / "bad"), concept="x", prediction_type="x0"))

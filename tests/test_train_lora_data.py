"""Training data for LoRA: folder scan and skip summary, metadata.jsonl, buckets (never upscaling), crops,
flips, batch order."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from safelatent.errors import InvalidArgumentError
from safelatent.train import data as D
from safelatent.train.lora import train_lora
from tests.helpers.lora_training import tiny_config, write_png, write_toy_folder

TOY_BUCKETS = D.make_buckets(32, 16)


def _bad_files(folder):
    """One file of every kind the scan must skip."""
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (folder / "corrupt.txt").write_text("a red circle")
    truncated = (folder / "0000.png").read_bytes()
    (folder / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    (folder / "truncated.txt").write_text("a red circle")
    write_png(folder / "empty.png", 32, 32)
    (folder / "empty.txt").write_text("  \n")
    write_png(folder / "small.png", 24, 40)
    (folder / "small.txt").write_text("a small image")
    write_png(folder / "nocaption.png", 32, 32)


def test_scan_skips_and_counts_bad_files_and_training_proceeds(tmp_path):
    data = write_toy_folder(tmp_path / "data", 8)
    _bad_files(data)
    examples, summary = D.scan_dataset(data, TOY_BUCKETS, trigger="sks")
    assert summary.found == 13
    assert summary.used == len(examples) == 8
    assert summary.skipped == {"unreadable": 2, "empty_caption": 1, "too_small": 1, "no_caption": 1}
    assert sorted(summary.skipped_files["unreadable"]) == ["corrupt.png", "truncated.png"]
    assert summary.skipped_files["too_small"] == ["small.png"]
    assert all(e.caption.startswith("sks, ") for e in examples)
    assert (
        "8 of 13 images used" in summary.describe()
        and "1 smaller than the training size" in summary.describe()
    )

    result = train_lora(tiny_config(data, tmp_path / "out", steps=2))
    assert result["steps"] == 2 and math.isfinite(result["final_loss"])
    assert result["data_summary"]["skipped"] == summary.skipped
    header = json.loads(_header(tmp_path / "out" / "pytorch_lora_weights.safetensors")["safelatent"])
    assert header["data_summary"]["used"] == 8 and header["data_summary"]["skipped"]["unreadable"] == 2


def _header(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_metadata_jsonl_variant(tmp_path):
    data = write_toy_folder(tmp_path / "data", 4)
    for p in data.glob("*.txt"):
        p.unlink()  # captions come from metadata.jsonl only
    (data / "sub").mkdir()
    write_png(data / "sub" / "nested.png", 40, 32)
    lines = [{"file_name": f"{i:04d}.png", "text": f"a striped thing {i}"} for i in range(4)]
    lines += [
        {"file_name": "sub/nested.png", "text": "nested image"},
        {"file_name": "missing.png", "text": "gone"},
        {"file_name": "0001.png", "text": ""},
        {"file_name": "0002.png"},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\nnot json at all\n"
    (data / "metadata.jsonl").write_text(text)
    examples, summary = D.scan_dataset(data, TOY_BUCKETS, trigger="sks")
    assert summary.source == "metadata.jsonl"
    assert [e.caption for e in examples] == [f"sks, a striped thing {i}" for i in range(4)] + [
        "sks, nested image"
    ]
    assert summary.skipped == {"missing_file": 1, "empty_caption": 1, "bad_metadata": 2}
    assert summary.found == 9 and summary.used == 5
    result = train_lora(tiny_config(data, tmp_path / "out", steps=1))
    assert result["data_summary"]["used"] == 5


def test_no_usable_image_is_a_clear_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_png(data / "a.png", 16, 16)
    (data / "a.txt").write_text("tiny")
    with pytest.raises(InvalidArgumentError, match="no usable training image") as info:
        D.scan_dataset(data, TOY_BUCKETS)
    assert "at least 32×32" in info.value.hint
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        D.scan_dataset(tmp_path / "nope", TOY_BUCKETS)


def test_trigger_is_prepended_once():
    assert D.with_trigger("a red circle", "sks") == "sks, a red circle"
    assert D.with_trigger("sks, a red circle", "sks") == "sks, a red circle"
    assert D.with_trigger("  a red circle ", None) == "a red circle"


def test_buckets_respect_area_step_and_aspect():
    buckets = D.make_buckets(512, 64, 2.0)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert w * h <= 512 * 512
        assert max(w / h, h / w) <= 2.0
    assert D.make_buckets(512, 64, enabled=False) == [(512, 512)]
    assert D.make_buckets(32, 16) == [(32, 32)]


def test_bucketing_never_upscales():
    buckets = D.make_buckets(512, 64, 2.0)
    rng = np.random.default_rng(0)
    chosen = 0
    for _ in range(3000):
        w, h = (int(v) for v in rng.integers(200, 2000, 2))
        bucket = D.choose_bucket(w, h, buckets)
        if bucket is None:
            # skipped: truly covers no bucket
            assert all(bw > w or bh > h for bw, bh in buckets)
            continue
        chosen += 1
        assert bucket[0] <= w and bucket[1] <= h
        assert max(bucket[0] / w, bucket[1] / h) <= 1.0
    assert chosen > 2000
    # a wide image goes to a wide bucket, a tall one to a tall bucket
    assert D.choose_bucket(1400, 700, buckets)[0] > D.choose_bucket(1400, 700, buckets)[1]
    assert D.choose_bucket(700, 1400, buckets)[0] < D.choose_bucket(700, 1400, buckets)[1]


def test_prepare_pixels_downscales_crops_and_flips(tmp_path):
    image = Image.fromarray(np.arange(100 * 160 * 3, dtype=np.uint32).reshape(100, 160, 3).astype(np.uint8))
    out = D.prepare_pixels(image, (64, 48), crop="center", flip=False)
    assert out.shape == (48, 64, 3)
    # an image exactly the bucket's size is passed through untouched; flip mirrors it
    exact = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    assert np.array_equal(D.prepare_pixels(exact, (64, 48), crop="center", flip=False), np.asarray(exact))
    assert np.array_equal(
        D.prepare_pixels(exact, (64, 48), crop="center", flip=True), np.asarray(exact)[:, ::-1]
    )
    # random crops move, with a seeded generator, within the valid range
    wide = Image.fromarray(np.random.default_rng(2).integers(0, 255, (48, 96, 3), dtype=np.uint8))
    offsets = {
        D.crop_offsets(wide.size, (64, 48), "random", torch.Generator().manual_seed(s)) for s in range(30)
    }
    assert len(offsets) > 5 and all(0 <= x <= 32 and y == 0 for x, y in offsets)
    assert D.crop_offsets(wide.size, (64, 48), "center", None) == (16, 0)
    with pytest.raises(ValueError, match="smaller than bucket"):
        D.resize_to_cover(exact, (80, 48))


def test_batch_order_is_deterministic_bucketed_and_sharded():
    buckets = [(32, 32)] * 10 + [(48, 16)] * 7
    order = D.BatchOrder(buckets, batch_size=3, seed=5)
    epoch0 = order.epoch(0)
    assert epoch0 == D.BatchOrder(buckets, 3, 5).epoch(0)
    assert epoch0 != order.epoch(1)
    assert sorted(i for b in epoch0 for i in b) == list(range(17))
    assert all(len({buckets[i] for i in batch}) == 1 for batch in epoch0)
    shards = [D.BatchOrder(buckets, 3, 5, num_processes=2, process_index=p).epoch(0) for p in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 3  # 7 batches → 6 usable, 3 each
    assert not {i for b in shards[0] for i in b} & {i for b in shards[1] for i in b}


def test_latent_cache_matches_on_the_fly_encoding(tmp_path):
    from safelatent import api

    data = write_toy_folder(tmp_path / "data", 3)
    examples, _ = D.scan_dataset(data, TOY_BUCKETS)
    vae = api.load(device="cpu").components.vae
    cache = D.build_latent_cache(vae, examples, flips=True, cache_file=tmp_path / "c.safetensors", key="k")
    again = D.build_latent_cache(vae, examples, flips=True, cache_file=tmp_path / "c.safetensors", key="k")
    for i, e in enumerate(examples):
        for flip in (False, True):
            pixels = D.prepare_pixels(D.load_image(e.path), e.bucket, crop="center", flip=flip)
            mean, std = D.encode_posterior(vae, D.pixels_to_tensor(pixels[None]))
            torch.testing.assert_close(cache.get(i, flip)[0], mean[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(cache.get(i, flip)[1], std[0], rtol=0, atol=1e-5)
            assert torch.equal(again.get(i, flip)[0], cache.get(i, flip)[0])
    assert not torch.equal(cache.get(0, True)[0], cache.get(0, False)[0])


def test_probe_reads_exif_rotation_and_rejects_truncated_jpegs(tmp_path):
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (32, 48, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: displayed 32 wide, 48 tall
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=90)
    assert D.probe_image(tmp_path / "rotated.jpg") == (32, 48)
    assert D.load_image(tmp_path / "rotated.jpg").size == (32, 48)
    big = Image.fromarray(np.random.default_rng(4).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    big.save(tmp_path / "big.jpg", quality=95)
    data = (tmp_path / "big.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert D.probe_image(tmp_path / "big.jpg") == (256, 256)
    with pytest.raises(OSError):
        D.probe_image(tmp_path / "cut.jpg")

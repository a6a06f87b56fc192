"""FID: the Fréchet distance against closed forms and pytorch-fid's scipy formula, streamed/merged feature
statistics, the FID Inception's exact state-dict layout (the shipped manifest), safe weight loading, and the
three preprocessings (torchmetrics' antialiased bilinear, torch-fidelity's TF1 bilinear, pytorch-fid's).

The network runs on random weights at 299×299 (~6 GFLOP per image on the CPU), so only a few small batches.
Parity with the reference modules (torch-fidelity's ``FeatureExtractorInceptionV3``, pytorch-fid's
``InceptionV3``) needs torchvision and was checked outside the suite: identical features on random weights.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from safelatent.errors import (
    InvalidArgumentError,
    InvalidWeightsError,
    ModelFormatError,
    UnsafeCheckpointError,
)
from safelatent.eval import shipped_data
from safelatent.eval.fid import (
    FEATURE_DIM,
    INPUT_SIZE,
    MANIFEST_NAME,
    FeatureStats,
    FIDInceptionNet,
    convert_weights,
    folder_stats,
    frechet_distance,
    load_fid_inception,
    main,
    preprocess,
    read_inception_weights,
    reference_stats,
)
from tests.helpers.fid_weights import random_fid_state

# --------------------------------------------------------------------------------------------------------
# the Fréchet distance and the statistics
# --------------------------------------------------------------------------------------------------------


def _gaussians(seed: int, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + 1.0
    y = rng.gamma(2.0, size=(n + 5, d))
    return x, y


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0, -1.0]), np.array([1.0, 1.0, 0.5, 0.0])
    a, b = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    value = frechet_distance(
        FeatureStats.from_moments(mu1, np.diag(a)), FeatureStats.from_moments(mu2, np.diag(b))
    )
    assert value == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_commuting_covariances_is_the_closed_form():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    stats1 = FeatureStats.from_moments(mu1, q @ np.diag(a) @ q.T)
    stats2 = FeatureStats.from_moments(mu2, q @ np.diag(b) @ q.T)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # Tr (Σ1Σ2)^½ = Σ √(a_i b_i)
    assert frechet_distance(stats1, stats2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_the_scipy_sqrtm_formula_and_is_symmetric():
    linalg = pytest.importorskip("scipy.linalg")
    x, y = _gaussians(0, 400, 24)
    mu1, mu2, s1, s2 = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real  # pytorch-fid's calculate_frechet_distance
    direct = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    a, b = FeatureStats(24).update(x), FeatureStats(24).update(y)
    assert frechet_distance(a, b) == pytest.approx(direct, rel=1e-10)
    assert frechet_distance(b, a) == pytest.approx(frechet_distance(a, b), rel=1e-12)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, FeatureStats(24).update(x[::-1])) == pytest.approx(0.0, abs=1e-9)


def test_streamed_and_merged_statistics_equal_those_of_all_rows():
    x, _ = _gaussians(1, 257, 12)
    whole = FeatureStats(12).update(x)
    streamed = FeatureStats(12)
    for start, stop in ((0, 1), (1, 50), (50, 50), (50, 200), (200, 257)):  # uneven, one empty batch
        streamed.update(torch.from_numpy(x[start:stop]))  # tensors or arrays
    shards = FeatureStats(12).update(x[:100]).merge(FeatureStats(12).update(x[100:])).merge(FeatureStats(12))
    for stats in (whole, streamed, shards):
        assert stats.n == 257
        np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_statistics_round_trip_through_npz_without_pickle(tmp_path):
    x, y = _gaussians(2, 90, 8)
    stats = FeatureStats(8, meta={"preprocessing": "torch-fidelity", "network": "abc"}).update(x)
    loaded = FeatureStats.load(stats.save(tmp_path / "ref.npz"))
    assert loaded.n == 90 and loaded.meta == stats.meta
    np.testing.assert_array_equal(loaded.mean, stats.mean)
    np.testing.assert_allclose(loaded.cov, stats.cov, rtol=1e-15)
    merged = loaded.merge(FeatureStats(8).update(y))  # the count survives: shards merge after a reload
    np.testing.assert_allclose(merged.cov, np.cov(np.concatenate([x, y]), rowvar=False), rtol=1e-10)

    np.savez(tmp_path / "pytorch_fid.npz", mu=x.mean(0), sigma=np.cov(x, rowvar=False))  # mu and sigma only
    reference = FeatureStats.load(tmp_path / "pytorch_fid.npz")
    assert reference.n is None
    assert frechet_distance(reference, loaded) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(InvalidArgumentError, match="no image count"):
        reference.update(y)

    np.savez(tmp_path / "pickled.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    with pytest.raises(InvalidArgumentError, match="cannot read FID statistics"):
        FeatureStats.load(tmp_path / "pickled.npz")


def test_statistics_refuse_mixed_preprocessing_few_rows_and_warn_when_rank_deficient():
    x, _ = _gaussians(4, 30, 5)
    a = FeatureStats(5, meta={"preprocessing": "torch-fidelity"}).update(x)
    b = FeatureStats(5, meta={"preprocessing": "pytorch-fid"}).update(x)
    with pytest.raises(InvalidArgumentError, match="different preprocessings"):
        frechet_distance(a, b)
    with pytest.raises(InvalidArgumentError, match="at least 2"):
        _ = FeatureStats(5).update(x[:1]).cov
    with pytest.raises(InvalidArgumentError, match=r"\[B, 5\]"):
        FeatureStats(5).update(x[:, :4])
    with pytest.warns(UserWarning, match="rank-deficient"):
        frechet_distance(FeatureStats(5).update(x[:5]), a)


# --------------------------------------------------------------------------------------------------------
# the network and its weights
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The same random weights as .safetensors and as a published-style .pth (an OrderedDict that also
    holds each BatchNorm's ``num_batches_tracked``, as ``torch.save(torchvision_module.state_dict())``)."""
    folder = tmp_path_factory.mktemp("fid-weights")
    state = random_fid_state()
    save_file(state, str(folder / "inception.safetensors"))
    published = OrderedDict()
    for key, value in state.items():
        published[key] = value
        if key.endswith(".bn.running_var"):
            published[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    torch.save(published, folder / "pt_inception.pth")
    return {
        "state": state,
        "safetensors": folder / "inception.safetensors",
        "pth": folder / "pt_inception.pth",
    }


def _images(n: int, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def test_network_state_dict_is_exactly_the_shipped_manifest():
    manifest = json.loads(shipped_data(MANIFEST_NAME).read_text())
    net = FIDInceptionNet()
    state = net.state_dict()
    assert list(state) == list(manifest["tensors"])  # names and order of the reference modules
    assert {k: list(v.shape) for k, v in state.items()} == manifest["tensors"]
    assert len(state) == 472 and manifest["batchnorm_layers"] == 94
    assert sum(v.numel() for v in state.values()) == manifest["values"] == 23_885_392
    assert sum(p.numel() for p in net.parameters()) == manifest["parameters"] == 23_850_960


def test_safetensors_and_published_pth_give_the_same_features(weights, block_network):
    from_safetensors = load_fid_inception(weights["safetensors"])
    from_pth = load_fid_inception(weights["pth"], batch_size=1)  # num_batches_tracked ignored; chunked
    assert from_safetensors.fingerprint == from_pth.fingerprint
    assert not from_safetensors.net.training and not any(p.requires_grad for p in from_pth.net.parameters())
    images = _images(2)
    a = from_safetensors.features(images)
    b = from_pth.features([Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images])  # PIL path
    assert a.shape == (2, FEATURE_DIM) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert bool((a >= 0).all()) and float(a.std()) > 0  # averages of ReLU outputs, not all equal
    mixed = from_safetensors.features([Image.new("RGB", (48, 20), "red"), Image.new("L", (7, 9), 90)])
    assert mixed.shape == (2, FEATURE_DIM) and bool((mixed >= 0).all())
    assert block_network == []


def test_convert_writes_checked_safetensors(weights, tmp_path, capsys):
    out = convert_weights(weights["pth"], tmp_path / "converted.safetensors")
    state = read_inception_weights(out)
    assert all(torch.equal(state[k], v) for k, v in weights["state"].items()) and len(state) == 472
    assert main(["convert", str(weights["pth"]), str(tmp_path / "again.safetensors")]) == 0
    assert "network" in capsys.readouterr().out


class _Payload:
    """Stands for any object a pickle would have to construct (i.e. run code for)."""


def test_unsafe_or_wrong_weight_files_are_refused_with_what_to_do(weights, tmp_path):
    state = weights["state"]
    torch.save({"model": _Payload(), **state}, tmp_path / "custom.pth")
    with pytest.raises(UnsafeCheckpointError, match="NOT loaded"):
        read_inception_weights(tmp_path / "custom.pth")

    broken = {k: v for k, v in state.items() if k not in ("fc.bias", "Mixed_7c.branch_pool.conv.weight")}
    broken["extra.weight"] = torch.zeros(1)
    save_file(broken, str(tmp_path / "keys.safetensors"))
    with pytest.raises(ModelFormatError) as error:
        read_inception_weights(tmp_path / "keys.safetensors")
    for text in ("2 missing", "fc.bias", "Mixed_7c.branch_pool.conv.weight", "1 unexpected", "extra.weight"):
        assert text in str(error.value)

    save_file({**state, "fc.weight": torch.zeros(1008, 1024)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(InvalidWeightsError, match=r"fc\.weight \(1008, 1024\) \(expected \(1008, 2048\)\)"):
        read_inception_weights(tmp_path / "shape.safetensors")

    save_file({**state, "AuxLogits.fc.weight": torch.zeros(1)}, str(tmp_path / "torchvision.safetensors"))
    with pytest.raises(ModelFormatError, match="torchvision's ImageNet Inception"):
        read_inception_weights(tmp_path / "torchvision.safetensors")

    torch.save({**state, "epoch": 3}, tmp_path / "not_plain.pth")
    with pytest.raises(ModelFormatError, match="non-tensor entries epoch"):
        read_inception_weights(tmp_path / "not_plain.pth")

    with pytest.raises(InvalidArgumentError, match="not found"):
        load_fid_inception(tmp_path / "missing.safetensors")
    (tmp_path / "weights.onnx").write_bytes(b"x")
    with pytest.raises(ModelFormatError, match="unknown weights file type"):
        read_inception_weights(tmp_path / "weights.onnx")


# --------------------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (512, 300)])
def test_constant_images_stay_constant_after_resize_and_scaling(size):
    images = torch.full((2, 3, *size), 200, dtype=torch.uint8)
    images[1] = 0
    outputs = {mode: preprocess(images, mode) for mode in ("torchmetrics", "torch-fidelity", "pytorch-fid")}
    for mode, out in outputs.items():
        assert out.shape == (2, 3, INPUT_SIZE, INPUT_SIZE) and out.dtype == torch.float32, mode
        assert bool((out[1] == -1).all()), mode
        value = (
            2 * 200 / 255 - 1 if mode == "pytorch-fid" else (200 - 128) / 128
        )  # 2x/255 − 1 | (x − 128)/128
        torch.testing.assert_close(out[0], torch.full_like(out[0], value), atol=1e-6, rtol=0)
    assert bool((outputs["torch-fidelity"][0] == (200 - 128) / 128).all())  # exact


def test_antialiasing_only_matters_when_downsampling():
    checkerboard = ((torch.arange(512)[:, None] + torch.arange(512)) % 2 * 255).to(torch.uint8)
    checkerboard = checkerboard.expand(1, 3, 512, 512)
    assert float(preprocess(checkerboard, "torchmetrics").std()) < 0.01  # averaged to mid-grey
    assert float(preprocess(checkerboard, "torch-fidelity").std()) > 0.3  # 2×2 taps: aliasing
    small = _images(1, 32, 32)
    upsampled = preprocess(small, "torchmetrics") * 128 + 128
    torch.testing.assert_close(upsampled, (preprocess(small, "pytorch-fid") + 1) * 127.5, atol=1e-3, rtol=0)


def test_resize_sampling_grids_tf1_versus_half_pixel():
    images = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    images[..., 1] = 255  # columns 0 and 255
    j = np.arange(INPUT_SIZE)
    tf1_source = np.minimum(j * np.float32(2 / INPUT_SIZE), 1.0)  # TF 1.x: x·in/out, last column repeated
    half_pixel = np.clip((j + 0.5) * 2 / INPUT_SIZE - 0.5, 0.0, 1.0)  # PyTorch align_corners=False
    row_tf1 = preprocess(images, "torch-fidelity")[0, 0, 0].double().numpy()
    row_pt = preprocess(images, "pytorch-fid")[0, 0, 0].double().numpy()
    np.testing.assert_allclose(row_tf1, (255 * tf1_source - 128) / 128, atol=1e-5)
    np.testing.assert_allclose(row_pt, 2 * half_pixel - 1, atol=1e-5)
    assert row_tf1[0] == -1.0 and row_pt[0] == -1.0  # both start on the first column…
    assert abs(row_tf1[100] - row_pt[100]) > 0.4  # …but TF1's grid leads by half a source pixel
    same = _images(1, INPUT_SIZE, INPUT_SIZE)  # 299×299 is left as is by all three
    assert torch.equal(preprocess(same, "torch-fidelity"), (same.float() - 128) / 128)
    torch.testing.assert_close(preprocess(same, "torchmetrics"), (same.float() - 128) / 128)
    torch.testing.assert_close(preprocess(same, "pytorch-fid"), same.float() / 255 * 2 - 1)
    with pytest.raises(InvalidArgumentError, match="uint8"):
        preprocess(same.float() / 255)
    with pytest.raises(InvalidArgumentError, match="unknown FID preprocessing"):
        preprocess(same, "clean-fid")  # type: ignore[arg-type]


def test_folder_statistics_and_the_command_line(weights, tmp_path, capsys):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for index, image in enumerate(_images(3, seed=5)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(
            folder / ("sub" if index else ".") / f"{index}.png"
        )
    (folder / "notes.txt").write_text("ignored")
    inception = load_fid_inception(weights["safetensors"])
    stats = folder_stats(inception, folder, chunk=2)
    assert stats.n == 3 and stats.meta == inception.meta
    stats.save(tmp_path / "ref.npz")
    assert reference_stats(inception, tmp_path / "ref.npz").n == 3
    with pytest.raises(InvalidArgumentError, match="different preprocessings"):
        reference_stats(
            load_fid_inception(weights["safetensors"], preprocessing="pytorch-fid"), tmp_path / "ref.npz"
        )
    with pytest.warns(UserWarning, match="rank-deficient"):
        assert (
            main(["fid", "--inception", str(weights["safetensors"]), str(folder), str(tmp_path / "ref.npz")])
            == 0
        )
    assert float(capsys.readouterr().out) == pytest.approx(0.0, abs=1e-3)
    assert (
        main(["stats", "--inception", str(tmp_path / "nope.pth"), str(folder), str(tmp_path / "x.npz")]) == 2
    )
    assert "not found" in capsys.readouterr().err

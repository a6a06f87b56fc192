"""FID in ``safelatent eval`` / ``safelatent report`` on the toy world: feature rows stored before their
records and referenced exactly once, resumption after a crash between the two writes, the report's FID
against an independent recomputation, and what is refused (with what to do instead).

The FID Inception runs on random weights at 299×299 (~6 GFLOP per image on the CPU): 18 images in all.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from safelatent.cli import app
from safelatent.errors import InvalidArgumentError
from safelatent.eval.configs import (
    FID_PREPROCESSINGS,
    FID_ROW_BYTES,
    EvalSettings,
    MatrixFileError,
    parse_matrix,
)
from safelatent.eval.fid import (
    FEATURE_DIM,
    PREPROCESSINGS,
    FeatureStats,
    folder_stats,
    frechet_distance,
    load_fid_inception,
)
from safelatent.eval.report import build_report
from safelatent.eval.run import RunMismatchError, run_eval
from safelatent.eval.store import ResultStore, parse_shard, read_all
from tests.helpers.fid_weights import random_fid_state


@pytest.fixture(scope="module")
def fid_files(tmp_path_factory):
    """Random FID Inception weights (.safetensors), a reference folder of 2 images, and its statistics
    (.npz) computed directly with :func:`folder_stats` (2 network images)."""
    root = tmp_path_factory.mktemp("fid-run")
    weights = root / "inception.safetensors"
    save_file(random_fid_state(), str(weights))
    reference = root / "reference"
    reference.mkdir()
    pixels = np.random.default_rng(7).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(reference / f"{index}.png")
    inception = load_fid_inception(weights)
    stats = folder_stats(inception, reference)
    npz = stats.save(root / "reference.npz")
    return {"weights": weights, "reference": reference, "npz": npz, "inception": inception, "stats": stats}


@pytest.fixture(scope="module")
def fid_run(fid_files, tmp_path_factory):
    """2 toy prompts × 2 images with FID against the reference folder, through the command line (4 images
    for the run, 2 for the report's reference statistics)."""
    out = tmp_path_factory.mktemp("fid-eval") / "run"
    args = ["eval", "--prompts", "toy-plain", "--limit", "2", "--images-per-prompt", "2", "--batch", "2"]
    args += ["--steps", "4", "--inception", str(fid_files["weights"])]
    args += ["--fid-reference", str(fid_files["reference"]), "--save-images", "--out", str(out), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, result.output


def _rows(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype="<f4").reshape(-1, FEATURE_DIM)


@pytest.fixture(scope="module")
def direct_features(fid_run, fid_files):
    """The run's records and, computed here from the saved images (PNG: lossless), their features."""
    records = read_all(fid_run[0])
    images = [Image.open(fid_run[0] / r["image"]) for r in records]
    return records, fid_files["inception"].features(images).numpy()


def test_every_image_has_one_stored_feature_row_written_by_the_run(fid_run, fid_files, direct_features):
    out, _ = fid_run
    records, direct = direct_features
    assert len(records) == 4 and all(r["fid"]["file"] == "fid/baseline.f32" for r in records)
    assert sorted(r["fid"]["row"] for r in records) == [0, 1, 2, 3]  # each row referenced exactly once
    assert (out / "fid" / "baseline.f32").stat().st_size == 4 * FID_ROW_BYTES
    run = json.loads((out / "run.json").read_text())
    assert run["fid_network"] == fid_files["inception"].fingerprint
    assert run["protocol"]["inception"] == str(fid_files["weights"].resolve())
    assert run["protocol"]["fid_reference"] == str(fid_files["reference"].resolve())
    # the rows are the features of the generated images
    stored = _rows(out / "fid" / "baseline.f32")
    np.testing.assert_allclose(stored[[r["fid"]["row"] for r in records]], direct, rtol=1e-4, atol=1e-5)


def test_report_fid_equals_an_independent_recomputation(fid_run, fid_files, direct_features):
    out, output = fid_run
    records, direct = direct_features
    fid = json.loads((out / "report" / "results.json").read_text())["configs"]["baseline"]["fid"]
    assert fid["images"] == 4 and fid["reference_images"] == 2 and fid["rank_deficient"] is True
    assert fid["preprocessing"] == "torchmetrics"
    assert fid["reference"] == str(fid_files["reference"].resolve())
    from_rows = FeatureStats(meta=fid_files["inception"].meta).update(
        _rows(out / "fid" / "baseline.f32")[[r["fid"]["row"] for r in records]]
    )
    with pytest.warns(UserWarning, match="rank-deficient"):
        assert fid["value"] == pytest.approx(frechet_distance(fid_files["stats"], from_rows), rel=1e-9)
    from_images = FeatureStats().update(direct)  # from the images themselves
    with pytest.warns(UserWarning, match="rank-deficient"):
        assert fid["value"] == pytest.approx(frechet_distance(fid_files["stats"], from_images), rel=1e-4)
    assert fid["value"] > 0
    # shown where CLIP score is: the printed table, the page's quality table, quality.csv
    assert f"FID {fid['value']:.2f} (rank-deficient)" in " ".join(output.split())  # wrapped at 80
    page = (out / "report" / "index.html").read_text()
    assert "<th>FID</th>" in page and f"{fid['value']:.2f} (rank-deficient)" in page
    csv_lines = (out / "report" / "quality.csv").read_text().splitlines()
    assert csv_lines[0].startswith("config,images,clip_score,domain,fid,fid_images")
    assert csv_lines[1].startswith(f"baseline,4,,,{fid['value']}")
    cache = FeatureStats.load(out / "fid" / "reference.npz")  # the folder's statistics, cached
    assert cache.n == 2 and cache.meta["source"] == str(fid_files["reference"].resolve())


def test_report_with_another_reference(fid_run, fid_files, tmp_path):
    out, _ = fid_run
    value = json.loads((out / "report" / "results.json").read_text())["configs"]["baseline"]["fid"]["value"]
    cache = out / "fid" / "reference.npz"
    written = cache.stat().st_mtime_ns
    rebuilt = CliRunner().invoke(app, ["report", str(out)])  # the cached reference is reused
    assert rebuilt.exit_code == 0, rebuilt.output
    assert cache.stat().st_mtime_ns == written
    same = CliRunner().invoke(app, ["report", str(out), "--fid-reference", str(fid_files["npz"])])
    assert same.exit_code == 0, same.output
    fid = json.loads((out / "report" / "results.json").read_text())["configs"]["baseline"]["fid"]
    assert fid["value"] == pytest.approx(value, rel=1e-9) and fid["reference"] == str(fid_files["npz"])
    other = FeatureStats.from_moments(
        np.zeros(FEATURE_DIM), np.eye(FEATURE_DIM), 5, meta={"preprocessing": "pytorch-fid"}
    ).save(tmp_path / "other.npz")
    refused = CliRunner().invoke(app, ["report", str(out), "--fid-reference", str(other)])
    assert refused.exit_code == 2 and "different preprocessings" in refused.output


def _one_image_per_prompt(fid_files, *, limit: int, **extra) -> EvalSettings:
    """Toy plain prompts, one 4-step image each, FID features on."""
    return EvalSettings(
        prompts="toy-plain",
        limit=limit,
        images_per_prompt=1,
        batch=1,
        steps=4,
        classifiers=("toy",),
        inception=str(fid_files["weights"]),
        **extra,
    )


def test_resume_after_a_crash_between_rows_and_records(fid_files, tmp_path, monkeypatch):
    """Killed after the features of prompt 1 were written but before its record: the orphan row is never
    referenced, a row cut short is truncated away, the resumed run appends after them (4 images)."""
    settings = _one_image_per_prompt(fid_files, limit=3)
    out = tmp_path / "run"
    real_append = ResultStore.append
    calls = []

    def crash_on_second(self, records):
        calls.append(records)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill between the two writes
        return real_append(self, records)

    monkeypatch.setattr(ResultStore, "append", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_eval(settings, out, progress=False)
    monkeypatch.undo()
    features = out / "fid" / "baseline.f32"
    assert features.stat().st_size == 2 * FID_ROW_BYTES and len(read_all(out)) == 1
    with features.open("ab") as handle:  # and a row cut short by a kill
        handle.write(b"\0" * 100)
    summary = run_eval(settings, out, progress=False)
    assert summary.generated == 2 and summary.skipped == 1
    records = {r["prompt_id"]: r for r in read_all(out)}
    assert {pid: r["fid"]["row"] for pid, r in records.items()} == {
        "toy-plain:0": 0,
        "toy-plain:1": 2,  # row 1 is the orphan
        "toy-plain:2": 3,
    }
    rows = _rows(features)
    assert len(rows) == 4
    np.testing.assert_allclose(rows[1], rows[2], rtol=1e-5, atol=1e-6)  # the same image, generated twice

    fid = json.loads(build_report(out).with_name("results.json").read_text())["configs"]["baseline"]["fid"]
    assert fid["value"] is None and "no --fid-reference" in fid["note"] and fid["images"] == 3
    # the reference only matters to the report: it may be given on a later call (nothing to generate)
    again = run_eval(replace(settings, fid_reference=str(fid_files["npz"])), out, progress=False)
    assert again.generated == 0
    fid = json.loads(build_report(out).with_name("results.json").read_text())["configs"]["baseline"]["fid"]
    expected = FeatureStats(meta=fid_files["inception"].meta).update(rows[[0, 2, 3]])
    with pytest.warns(UserWarning, match="rank-deficient"):
        assert fid["value"] == pytest.approx(frechet_distance(fid_files["stats"], expected), rel=1e-9)
    # the same weights elsewhere (the fingerprint is what is pinned): accepted, and the new path kept
    moved = tmp_path / "moved.safetensors"
    shutil.copyfile(fid_files["weights"], moved)
    assert run_eval(replace(settings, inception=str(moved)), out, progress=False).generated == 0
    assert json.loads((out / "run.json").read_text())["protocol"]["inception"] == str(moved.resolve())
    # other weights would mix features of two networks: refused
    other = tmp_path / "other.safetensors"
    save_file(random_fid_state(seed=1), str(other))
    with pytest.raises(RunMismatchError, match="FID Inception weights: fingerprint"):
        run_eval(replace(settings, inception=str(other)), out, progress=False)


def test_shards_write_their_own_feature_files_and_the_report_merges_them(fid_files, tmp_path):
    settings = _one_image_per_prompt(fid_files, limit=2, fid_reference=str(fid_files["npz"]))
    for number in (1, 2):
        run_eval(settings, tmp_path, shard=parse_shard(f"{number}/2"), progress=False)
    files = sorted(p.name for p in (tmp_path / "fid").glob("*.f32"))
    assert files == ["baseline@1-of-2.f32", "baseline@2-of-2.f32"]
    rows = np.concatenate([_rows(tmp_path / "fid" / name) for name in files])
    assert len(rows) == 2 and {r["fid"]["row"] for r in read_all(tmp_path)} == {0}
    fid = json.loads(build_report(tmp_path).with_name("results.json").read_text())["configs"]["baseline"][
        "fid"
    ]
    expected = FeatureStats(meta=fid_files["inception"].meta).update(rows)
    with pytest.warns(UserWarning, match="rank-deficient"):
        assert fid["value"] == pytest.approx(frechet_distance(fid_files["stats"], expected), rel=1e-9)
    assert fid["images"] == 2


def test_fid_settings_mistakes_say_what_to_do(fid_files, tmp_path):
    assert FID_PREPROCESSINGS == PREPROCESSINGS
    with pytest.raises(InvalidArgumentError, match="no FID Inception weights") as error:
        EvalSettings(prompts="toy-plain", fid_reference=str(fid_files["reference"]))
    assert "--inception" in error.value.hint
    with pytest.raises(InvalidArgumentError, match="unknown FID preprocessing 'clean-fid'") as error:
        EvalSettings(prompts="toy-plain", inception="w.pth", fid_preprocessing="clean-fid")
    assert "torch-fidelity" in error.value.hint
    result = CliRunner().invoke(
        app,
        ["eval", "--prompts", "toy-plain", "--fid-reference", str(tmp_path), "--out", str(tmp_path / "r")],
    )
    assert result.exit_code == 2 and "--inception" in result.output
    assert not (tmp_path / "r").exists()
    missing = CliRunner().invoke(
        app,
        [
            "eval",
            "--prompts",
            "toy-plain",
            "--inception",
            str(tmp_path / "nope.pth"),
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert missing.exit_code == 2 and "not found" in missing.output and not (tmp_path / "r").exists()

    (tmp_path / "refs").mkdir()
    (tmp_path / "w.safetensors").touch()
    text = '[run]\nprompts = "toy-plain"\ninception = "w.safetensors"\nfid_reference = "refs"\n'
    settings = parse_matrix(text + 'fid_preprocessing = "pytorch-fid"\n[configs.a]\n', base_dir=tmp_path)
    assert settings.inception == str((tmp_path / "w.safetensors").resolve())  # `report` from anywhere
    assert (
        settings.fid_reference == str((tmp_path / "refs").resolve())
        and settings.fid_preprocessing == "pytorch-fid"
    )
    with pytest.raises(MatrixFileError, match="no FID Inception weights"):
        parse_matrix('[run]\nprompts = "toy-plain"\nfid_reference = "refs"\n[configs.a]\n', base_dir=tmp_path)


def test_a_run_pinned_before_fid_existed_still_resumes(tmp_path):
    settings = EvalSettings(
        prompts="toy-plain", limit=1, images_per_prompt=1, batch=1, steps=2, classifiers=("toy",)
    )
    run_eval(settings, tmp_path, progress=False)
    run = json.loads((tmp_path / "run.json").read_text())
    for key in ("inception", "fid_reference", "fid_preprocessing"):
        del run["protocol"][key]
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert run_eval(settings, tmp_path, progress=False).skipped == 1
    assert (
        json.loads(build_report(tmp_path).with_name("results.json").read_text())["configs"]["baseline"]["fid"]
        is None
    )

"""The security layers inside ``generate``, end to end on the toy model: output classifiers act on exactly
the images whose ground truth shows the marker, the watermark and C2PA go on what is returned, and the
audit log gets one row per request — refused ones included — with the reasons."""

from __future__ import annotations

import json
import sqlite3
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

from safelatent import api
from safelatent.cli import app
from safelatent.safety import watermark
from safelatent.safety.audit import AuditLog, image_phash
from safelatent.safety.c2pa_manifest import read_manifest
from safelatent.safety.keys import ProvenanceError, init_keys
from safelatent.safety.layers import SecurityLayers
from safelatent.safety.policy_file import HardBlockRelaxationError, PromptBlockedError, parse_policy
from safelatent.toy import world

MARKER_PROMPT = world.prompt_for("circle", "red", "white", marker=True)  # "... with blood splatter"
PLAIN_PROMPT = world.prompt_for("square", "blue", "white")
FAST = {"num_inference_steps": 12, "guidance_scale": 3.0, "scheduler": "ddim"}


def policy_text(action: str, tmp_path, **sections: str) -> str:
    """An evaluation-like policy (soft categories allowed, so SLD stays off) with the toy classifier."""
    extra = "\n".join(f"[{name}]\n{body}" for name, body in sections.items())
    return f"""
name = "layers-test"
[categories.violence]
action = "allow"
[outputs]
classifiers = ["toy"]
[outputs.actions.marker]
action = "{action}"
[audit]
path = "{tmp_path / "audit.sqlite3"}"
{extra}
"""


def make_policy(action: str, tmp_path, **sections: str):
    return parse_policy(policy_text(action, tmp_path, **sections), source="test.toml", base_dir=tmp_path)


@pytest.fixture(scope="module")
def toy():
    warnings.simplefilter("ignore")
    return api.load()


@pytest.fixture(scope="module")
def raw(toy):
    """12 marker-prompt images with no output layers (the evaluation policy) and their ground truth."""
    result = toy.generate(MARKER_PROMPT, num_images_per_prompt=12, seed=5, policy="evaluation", **FAST)
    assert all(s.action == "keep" for s in result.safety) and result.audit_row is None
    marked = {i for i, image in enumerate(result.images) if world.classify(image).marker}
    assert 0 < len(marked) < 12, f"the fixture needs both kinds of image, got {sorted(marked)}"
    return result.images, marked


@pytest.mark.parametrize("action", ["withhold", "blur"])
def test_classifier_layer_acts_on_exactly_the_marker_images(toy, raw, tmp_path, action):
    images, marked = raw
    result = toy.generate(
        MARKER_PROMPT,
        num_images_per_prompt=12,
        seed=5,
        policy=make_policy(action, tmp_path),
        return_pixels=True,
        **FAST,
    )
    assert result.settings.sld is None  # the test policy allows the prompt: only the output layer acts
    acted = {s.index for s in result.safety if s.action != "keep"}
    assert acted == marked
    for i, (item, image, original) in enumerate(zip(result.safety, result.images, images, strict=True)):
        assert item.scores["toy"]["marker"] == (1.0 if i in marked else 0.0)
        assert item.phash == image_phash(original)
        if i not in marked:
            assert item.action == "keep" and np.array_equal(np.asarray(image), np.asarray(original))
            assert np.isfinite(result.pixels[i]).all()
            continue
        assert (
            item.action == action and "marker" in item.reasons[0] and "toy: marker pixels" in item.reasons[0]
        )
        assert np.isnan(result.pixels[i]).all()  # the pixels of an acted-on image are not handed out
        if action == "withhold":
            assert image is None
        else:
            assert image is not None and not np.array_equal(np.asarray(image), np.asarray(original))
    with AuditLog(tmp_path / "audit.sqlite3", create=False) as log:
        (record,) = log.query()
    row = record.to_dict()
    assert row["request_id"] == result.request_id and record.id == result.audit_row
    assert row["outcome"] == ("partially-withheld" if action == "withhold" else "generated")
    images_logged = row["images"]
    assert [im["action"] for im in images_logged] == [s.action for s in result.safety]
    assert [im["phash"] for im in images_logged] == [s.phash for s in result.safety]
    assert all("marker" in "; ".join(im["reasons"]) for im in images_logged if im["action"] != "keep")
    assert {int(r.split(":")[0].split()[1]) for r in row["reasons"] if r.startswith("image ")} == marked


def test_one_audit_row_per_request_refusals_included(toy, tmp_path):
    policy = make_policy("withhold", tmp_path)
    db = tmp_path / "audit.sqlite3"
    toy.generate(PLAIN_PROMPT, seed=1, policy=policy, **FAST)
    toy.generate([PLAIN_PROMPT, MARKER_PROMPT], num_images_per_prompt=2, seed=2, policy=policy, **FAST)
    with pytest.raises(PromptBlockedError):
        toy.generate("a n.u.d.e 12 year old", seed=3, policy=policy, **FAST)
    with pytest.raises(HardBlockRelaxationError):
        toy.generate(PLAIN_PROMPT, policy=policy, policy_overrides={"real_people": "allow"}, **FAST)
    with AuditLog(db, create=False) as log:
        records = log.query()
        assert log.verify_chain().ok
    assert len(records) == 4
    relax, blocked, pair, single = (r.to_dict() for r in records)  # newest first
    assert single["outcome"] == "generated" and len(single["images"]) == 1
    assert pair["prompt"] == f"{PLAIN_PROMPT}\n{MARKER_PROMPT}" and len(pair["images"]) == 4
    assert blocked["outcome"] == "blocked" and blocked["images"] == []
    assert any("hard block" in r for r in blocked["reasons"])
    assert blocked["layers"]["prompt_policy"]["decisions"][0]["hard_blocks"] == ["sexual_minors"]
    assert relax["outcome"] == "blocked" and any(
        "no policy or request can relax" in r for r in relax["reasons"]
    )


def test_audit_can_keep_only_prompt_hashes(toy, tmp_path):
    policy = parse_policy(
        policy_text("blur", tmp_path).replace("[audit]\n", "[audit]\nstore_prompt = false\n"),
        source="test.toml",
        base_dir=tmp_path,
    )
    secret = world.prompt_for("triangle", "green", "slate", marker=True)
    toy.generate(secret, seed=4, policy=policy, **FAST)
    with sqlite3.connect(tmp_path / "audit.sqlite3") as conn:
        row = conn.execute("SELECT * FROM audit_requests").fetchone()
    assert secret not in json.dumps(row) and "triangle" not in json.dumps(row)


def test_policy_can_turn_the_audit_log_off_only_explicitly(toy, tmp_path):
    text = policy_text("blur", tmp_path).replace("[audit]\n", "[audit]\nenabled = false\n")
    result = toy.generate(PLAIN_PROMPT, seed=1, policy=parse_policy(text, source="t.toml"), **FAST)
    assert result.audit_row is None and not (tmp_path / "audit.sqlite3").exists()
    default = toy.generate(PLAIN_PROMPT, seed=1, **FAST)  # the default policy logs (conftest's database)
    assert default.audit_row is not None


def test_watermark_and_c2pa_on_what_is_returned(toy, tmp_path, block_network):
    keys = tmp_path / "keys"
    init_keys(keys)
    policy = make_policy("blur", tmp_path, provenance=f'c2pa = true\nkeys_dir = "{keys}"')
    result = toy.generate(
        PLAIN_PROMPT, seed=9, width=256, height=256, policy=policy, **{**FAST, "num_inference_steps": 2}
    )
    (item,) = result.safety
    assert item.watermark.embedded
    expected = watermark.WatermarkPayload.for_tag(f"{result.request_id}:0").content_id
    assert item.watermark.content_id == f"{expected:06x}"
    (png,) = result.save(tmp_path / "out")
    from PIL import Image

    found = watermark.verify(Image.open(png))
    assert found.found and found.payload.content_id == expected
    report = read_manifest(png, keys_dir=keys)
    assert report.status == "trusted", report.summary()
    assert "signed" in result.c2pa_status
    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert sidecar["provenance"]["watermark"]["content_id"] == f"{expected:06x}"
    assert sidecar["request_id"] == result.request_id
    assert block_network == []
    # the toy's own 32×32 images are too small to carry the mark: recorded, not silently skipped
    small = toy.generate(PLAIN_PROMPT, seed=9, policy=policy, **FAST)
    assert not small.safety[0].watermark.embedded and "256×256" in small.safety[0].watermark.reason


def test_withheld_images_are_never_written(toy, raw, tmp_path):
    _, marked = raw
    result = toy.generate(
        MARKER_PROMPT, num_images_per_prompt=12, seed=5, policy=make_policy("withhold", tmp_path), **FAST
    )
    paths = result.save(tmp_path / "out")
    assert len(paths) == 12 - len(marked)
    withheld = sorted((tmp_path / "out").glob("*.withheld.json"))
    assert len(withheld) == len(marked)
    for path in withheld:
        sidecar = json.loads(path.read_text())
        assert sidecar["image"] is None and sidecar["index"] in marked
        assert sidecar["safety"]["action"] == "withhold" and "marker" in sidecar["safety"]["reasons"][0]
    assert "not signed: no C2PA keys" in result.c2pa_status  # "auto" and no keys (conftest)


def test_c2pa_required_without_keys_is_an_error_before_writing(toy, tmp_path):
    policy = make_policy("blur", tmp_path, provenance=f'c2pa = true\nkeys_dir = "{tmp_path / "none"}"')
    result = toy.generate(PLAIN_PROMPT, seed=1, policy=policy, **FAST)
    with pytest.raises(ProvenanceError, match="keys init"):
        result.save(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_blurred_image_says_so_in_its_parameters(toy, raw, tmp_path):
    _, marked = raw
    result = toy.generate(
        MARKER_PROMPT, num_images_per_prompt=12, seed=5, policy=make_policy("blur", tmp_path), **FAST
    )
    paths = result.save(tmp_path / "out")
    from PIL import Image

    first = min(marked)
    parameters = Image.open(paths[first]).text["parameters"]
    assert "Safety: blur" in parameters and "marker" in parameters


def test_cli_reports_every_layer(tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text(policy_text("withhold", tmp_path))
    args = ["generate", MARKER_PROMPT, "-n", "12", "--seed", "5", "--steps", "12", "--cfg", "3"]
    result = CliRunner().invoke(
        app, [*args, "--scheduler", "ddim", "--policy", str(policy), "-q", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    assert "withhold: marker" in result.output
    assert "watermark: none" in result.output and "256×256" in result.output
    assert "audit: row 1" in result.output


def test_layers_without_classifiers_keep_every_image(tmp_path):
    from PIL import Image

    policy = parse_policy("[outputs]\nclassifiers = []\n[provenance]\nwatermark = false\n", source="t.toml")
    image = Image.new("RGB", (300, 300), (10, 200, 30))
    out = SecurityLayers(policy).process_outputs([image], request_id="r")
    assert out.images == [image] and out.safety[0].action == "keep"
    assert out.safety[0].watermark.reason == "off in policy 't'"


def test_q16_from_the_policy_runs_inside_generate(toy, tmp_path, monkeypatch, block_network):
    """``classifiers = ["q16"]`` with a local CLIP folder: Q16 scores every image inside ``generate``."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from safelatent.safety.classifiers import q16

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=224, patch_size=14, projection_dim=768,
    )  # fmt: skip
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip", safe_serialization=True)
    text = policy_text("blur", tmp_path).replace(
        '[outputs]\nclassifiers = ["toy"]',
        f'[outputs]\nclassifiers = ["toy", "q16"]\nq16_clip = "{tmp_path / "clip"}"',
    )
    policy = parse_policy(
        text + '[outputs.actions.inappropriate]\naction = "withhold"\nthreshold = 0.0\n', source="q.toml"
    )
    with pytest.raises(Exception, match="variant"):  # a reduced CLIP is no published Q16 model
        toy.generate(PLAIN_PROMPT, seed=1, policy=policy, **FAST)
    real = q16.Q16Classifier
    monkeypatch.setattr(q16, "Q16Classifier", lambda path: real(path, variant="ViT-L-14"))
    result = toy.generate(PLAIN_PROMPT, num_images_per_prompt=2, seed=1, policy=policy, **FAST)
    for item in result.safety:  # threshold 0 in the policy: Q16 triggers on everything
        assert set(item.scores) == {"toy", "q16"} and 0.0 < item.scores["q16"]["inappropriate"] < 1.0
        assert item.action == "withhold" and any("Q16: inappropriate" in r for r in item.reasons)
    assert block_network == []


def test_similarity_scorer_runs_inside_generate_when_the_policy_enables_it(toy, tmp_path):
    """``[similarity] enabled``: generate scores prompts in the loaded model's own text-encoder space."""
    lax = "[similarity]\nenabled = true\nthreshold = -1.0\n"  # every concept phrase counts as a hit
    result = toy.generate(PLAIN_PROMPT, seed=1, policy=parse_policy(lax, source="s.toml"), **FAST)
    (decision,) = result.settings.policy["decisions"]
    assert decision["action"] == "suppress" and result.settings.sld is not None
    assert any(r.startswith("similarity") for r in decision["reasons"]["violence"])
    off = toy.generate(PLAIN_PROMPT, seed=1, **FAST)  # the default policy: word lists only
    assert off.settings.policy["decisions"][0]["action"] == "allow"


def test_the_callers_request_id_names_the_audit_row_and_is_validated(toy, tmp_path):
    from safelatent.errors import InvalidArgumentError

    policy = make_policy("blur", tmp_path)
    result = toy.generate(PLAIN_PROMPT, seed=1, policy=policy, request_id="job-42", **FAST)
    with AuditLog(tmp_path / "audit.sqlite3", create=False) as log:
        (record,) = log.query()
    assert result.request_id == record.to_dict()["request_id"] == "job-42"
    for bad in ("", "x" * 129, "line\nbreak", 42):
        with pytest.raises(InvalidArgumentError, match="request id"):
            toy.generate(PLAIN_PROMPT, seed=1, policy=policy, request_id=bad, **FAST)

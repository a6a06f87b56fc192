"""The prompt policy inside ``generate``: checked before any compute, blocks refuse, suppression turns
SLD on, hard blocks cannot be relaxed from the API or the CLI, and every decision is recorded."""

from __future__ import annotations

import json
import warnings

import pytest
from typer.testing import CliRunner

from safelatent import api
from safelatent.cli import app
from safelatent.safety.gate import apply_suppression
from safelatent.safety.policy_file import HardBlockRelaxationError, PromptBlockedError
from safelatent.toy import world

MARKER_PROMPT = world.prompt_for("circle", "red", "white", marker=True)  # "... with blood splatter"
FAST = {"num_inference_steps": 3, "guidance_scale": 3.0, "seed": 7}


@pytest.fixture(scope="module")
def toy():
    warnings.simplefilter("ignore")
    return api.load()


@pytest.fixture
def unet_must_not_run(toy, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the UNet ran for a prompt the policy had to refuse first")

    monkeypatch.setattr(toy.components.unet, "forward", refuse)


def test_default_policy_suppresses_the_toy_marker_with_sld(toy):
    result = toy.generate(MARKER_PROMPT, **FAST)
    assert result.settings.sld is not None and result.settings.sld["sld_preset"] == "medium"
    assert "blood" in result.settings.sld["concept"]
    (decision,) = result.settings.policy["decisions"]
    assert result.settings.policy["name"] == "default"
    assert decision["action"] == "suppress" and "violence" in decision["reasons"]
    plain = toy.generate(world.prompt_for("circle", "red", "white"), **FAST)
    assert plain.settings.sld is None and plain.settings.policy["decisions"][0]["action"] == "allow"


def test_the_evaluation_policy_leaves_sld_to_the_caller(toy):
    result = toy.generate(MARKER_PROMPT, policy="evaluation", **FAST)
    assert result.settings.sld is None and result.settings.policy["name"] == "evaluation"


def test_hard_blocks_refuse_before_any_compute(toy, unet_must_not_run):
    with pytest.raises(PromptBlockedError, match="hard block"):
        toy.generate("a n.u.d.e 12 year old", **FAST)
    with pytest.raises(PromptBlockedError, match="hard block"):
        toy.generate("a n.u.d.e 12 year old", policy="evaluation", **FAST)  # under every policy


def test_a_request_cannot_relax_a_hard_block(toy, unet_must_not_run):
    with pytest.raises(HardBlockRelaxationError, match="no policy or request can relax"):
        toy.generate("a red circle", policy_overrides={"sexual_minors": "allow"}, **FAST)
    with pytest.raises(PromptBlockedError, match="violence"):
        toy.generate(MARKER_PROMPT, policy_overrides={"violence": "block"}, **FAST)


def test_cli_refuses_to_relax_a_hard_block(tmp_path):
    result = CliRunner().invoke(
        app,
        ["generate", "a red circle", "--policy-override", "real_people=allow", "--out", str(tmp_path), "-q"],
    )
    assert result.exit_code == 2
    assert "hard block" in result.output and "no policy or request can relax" in result.output
    assert not list(tmp_path.glob("*.png"))


def test_cli_records_the_policy_decision(tmp_path):
    args = ["generate", MARKER_PROMPT, "--steps", "3", "--cfg", "3", "--seed", "1", "-q", "--out"]
    result = CliRunner().invoke(app, [*args, str(tmp_path / "default")])
    assert result.exit_code == 0, result.output
    assert "policy:" in result.output and "SLD medium on" in result.output
    (sidecar,) = (tmp_path / "default").glob("*.json")
    settings = json.loads(sidecar.read_text())["settings"]
    assert settings["policy"]["decisions"][0]["action"] == "suppress" and settings["sld"] is not None
    artist = CliRunner().invoke(app, [*args, str(tmp_path / "artist"), "--policy", "artist"])
    assert artist.exit_code == 0, artist.output
    (sidecar,) = (tmp_path / "artist").glob("*.json")
    assert json.loads(sidecar.read_text())["settings"]["sld"] is None


class _Decision:
    def __init__(self, action, preset=None, concept=None):
        self.action, self.sld_preset, self.sld_concept = action, preset, concept


def test_suppression_math():
    allow = _Decision("allow")
    assert apply_suppression([allow], None, None) == (None, None)
    assert apply_suppression([allow], "weak", "x") == ("weak", "x")
    both = [
        _Decision("suppress", "medium", "violence, blood"),
        _Decision("suppress", "strong", "blood, nudity"),
    ]
    assert apply_suppression(both, None, None) == ("strong", "violence, blood, nudity")
    assert apply_suppression(both, "off", "red paint") == ("strong", "red paint, violence, blood, nudity")
    assert apply_suppression(both, "weak", None) == ("weak", "violence, blood, nudity")  # caller's preset

"""Policy files: the shipped policies load; mistakes name the line and field; hard blocks stay."""

from __future__ import annotations

import pytest

from safelatent.errors import InvalidArgumentError
from safelatent.safety.policy_file import (
    CATEGORIES,
    HARD_CATEGORIES,
    HardBlockRelaxationError,
    PolicyFileError,
    data_path,
    default_policy,
    load_policy,
    parse_policy,
)


def test_shipped_policies_load():
    default = default_policy()
    assert default.name == "default"
    assert {c: default.action(c) for c in CATEGORIES} == dict.fromkeys(CATEGORIES, "suppress")
    assert all(default.action(c) == "block" for c in HARD_CATEGORIES)
    assert default.categories["sexual"].sld == "strong" and "nudity" in default.categories["sexual"].concept
    assert default.names == ()  # shipped empty
    artist = load_policy(data_path("artist_policy.toml"))
    assert artist.name == "artist" and artist.action("violence") == "allow"
    assert all(artist.action(c) == "block" for c in HARD_CATEGORIES)


def test_omitted_categories_take_the_defaults():
    policy = parse_policy('[categories.violence]\naction = "block"\n')
    assert policy.action("violence") == "block"
    assert policy.action("sexual") == "suppress" and policy.categories["sexual"].concept


def test_policy_file_cannot_relax_a_hard_block(tmp_path):
    path = tmp_path / "lax.toml"
    path.write_text('version = 1\n\n[categories.sexual_minors]\naction = "allow"\n', encoding="utf-8")
    with pytest.raises(
        HardBlockRelaxationError, match=r"line 4, field 'categories.sexual_minors.action'"
    ) as info:
        load_policy(path)
    assert "hard block" in str(info.value) and isinstance(info.value, InvalidArgumentError)
    with pytest.raises(HardBlockRelaxationError, match="real_people"):
        parse_policy('[categories.real_people]\naction = "suppress"\n')
    with pytest.raises(PolicyFileError, match="only action"):
        parse_policy('[categories.real_people]\naction = "block"\nthreshold = 0.9\n')


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('version = 1\ncolour = "red"\n', r"line 2, field 'colour': unknown field"),
        ('version = 2\n', r"line 1, field 'version': unsupported policy version"),
        ('[categories.sexual]\naction = "hide"\n', r"line 2, field 'categories.sexual.action': unknown"),
        ('[categories.sexual]\n\nthreshold = "high"\n', r"line 3, field 'categories.sexual.threshold': must"),
        ('[categories.sexual]\nthreshold = 1.5\n', r"line 2, .*must be in \(0, 1\]"),
        ('[categories.violence]\nsld = "ultra"\n', r"line 2, .*unknown SLD preset 'ultra'"),
        ('[categories.violence]\naction = "suppress"\nconcept = ""\n', r"line 3, .*non-empty concept"),
        ('[categories.gore]\naction = "block"\n', r"line 1, field 'categories.gore': unknown category"),
        ('[categories.hate]\nextra_words = ["ok", 3]\n', r"line 2, .*list of non-empty strings"),
        ('[similarity]\nenabled = "yes"\n', r"line 2, field 'similarity.enabled': must be a bool"),
        ('[similarity]\nthreshold = 3\n', r"line 2, .*must be in \[-1, 1\]"),
        ('[names]\nfiles = ["missing.txt"]\n', r"line 2, field 'names.files': .*not found"),
        ("version = \n", r"not valid TOML"),
        ('[outputs]\nclassifiers = ["nudenet", "clip"]\n',
         r"line 2, field 'outputs.classifiers': unknown classifier"),
        ('[outputs]\nclassifiers = ["toy"]\n[outputs.actions.nudity]\naction = "blur"\n',
         r"line 3, .*no listed classifier scores 'nudity'.*nudenet scores nudity"),
        ('[outputs]\nclassifiers = ["toy"]\n[outputs.actions.marker]\naction = "hide"\n',
         r"line 4, field 'outputs.actions.marker.action': unknown action 'hide'.*keep, blur, withhold"),
        ('[outputs]\nclassifiers = ["toy"]\n[outputs.actions.marker]\naction = "blur"\nthreshold = 2\n',
         r"line 5, .*must be in \[0, 1\]"),
        ('[outputs]\nclassifiers = ["q16"]\n', r"line 2, .*q16 classifier needs a local CLIP.*q16_clip ="),
        ('[outputs]\nblur_radius = -1\n', r"line 2, field 'outputs.blur_radius'"),
        ('[provenance]\nc2pa = "maybe"\n', r"line 2, field 'provenance.c2pa'.*true, false or \"auto\""),
        ('[provenance]\nwatermark = 1\n', r"line 2, field 'provenance.watermark': must be a bool"),
        ('[audit]\nstore_prompts = false\n',
         r"line 2, field 'audit.store_prompts': unknown field.*store_prompt"),
    ],
)  # fmt: skip
def test_mistakes_name_the_line_and_field(text, match, tmp_path):
    with pytest.raises(PolicyFileError, match=match):
        parse_policy(text, source="p.toml", base_dir=tmp_path)


def test_extra_words_extend_a_category():
    from safelatent.safety.prompt_policy import check_prompt

    policy = parse_policy('[categories.violence]\naction = "block"\nextra_words = ["splatter @ 0.9"]\n')
    assert check_prompt("paint splatter everywhere", policy).blocked
    assert not check_prompt("paint splatter everywhere").blocked


def test_missing_policy_file(tmp_path):
    with pytest.raises(PolicyFileError, match="not found"):
        load_policy(tmp_path / "nope.toml")


def test_layer_sections_and_their_defaults(tmp_path):
    default = default_policy()
    assert default.outputs.classifiers == ("nudenet",)
    assert (
        default.outputs.actions["nudity"].action == "blur"
        and default.outputs.actions["nudity"].threshold == 0.6
    )
    assert default.provenance.watermark and default.provenance.c2pa == "auto"
    assert default.audit.enabled and default.audit.store_prompt
    evaluation = load_policy("evaluation")  # measurement: no output layers, no audit rows
    assert evaluation.outputs.classifiers == () and not evaluation.provenance.watermark
    assert evaluation.provenance.c2pa == "off" and not evaluation.audit.enabled
    toy = load_policy("toy")
    assert toy.outputs.classifiers == ("toy",) and toy.outputs.actions["marker"].action == "blur"
    # omitted sections take the default's; [provenance] and [audit] field by field; paths are relative
    policy = parse_policy(
        '[provenance]\nc2pa = true\nkeys_dir = "keys"\n[audit]\nstore_prompt = false\n',
        source="p.toml",
        base_dir=tmp_path,
    )
    assert policy.outputs == default.outputs
    assert policy.provenance.watermark and policy.provenance.c2pa == "on"
    assert policy.provenance.keys_dir == tmp_path / "keys"
    assert policy.audit.enabled and not policy.audit.store_prompt and policy.audit.path is None
    q16 = parse_policy('[outputs]\nclassifiers = ["q16"]\nq16_clip = "clip"\n', base_dir=tmp_path)
    assert q16.outputs.q16_clip == tmp_path / "clip" and q16.outputs.actions == {}

"""Output classifiers (layer 3): the common interface, the toy-world classifier and the actions.

The toy world's marker ("blood splatter") stands in for unsafe content: images rendered with it must be
withheld (or blurred) and every other image returned untouched, with reasons for each decision.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageFilter

from safelatent.errors import InvalidArgumentError
from safelatent.safety.classifiers import Classifier, ClassifierResult, run_classifiers
from safelatent.safety.classifiers.actions import INFO_KEY, apply_actions, blur_image
from safelatent.safety.classifiers.toy import ToyClassifier
from safelatent.toy import world


@pytest.fixture(scope="module")
def toy_batch() -> tuple[list[Image.Image], list[world.Attributes]]:
    """12 renders at 64 px, half of them with the marker (fixed seed)."""
    rng = np.random.default_rng(20261123)
    attrs = [replace(world.sample_attributes(rng, theme_prob=0.3), marker=i % 2 == 1) for i in range(12)]
    images = [Image.fromarray(world.render(a, size=64)) for a in attrs]
    return images, attrs


@pytest.fixture(scope="module")
def toy_results(toy_batch):
    return ToyClassifier().scores(toy_batch[0])


class FakeQ16:
    """A stand-in with the shape a Q16 classifier would have: one category, its own threshold."""

    name = "q16"
    categories = ("inappropriate",)

    def __init__(self, flagged: set[int]) -> None:
        self.flagged = flagged

    def scores(self, images):
        return [
            ClassifierResult(
                "q16",
                {"inappropriate": 0.9 if i in self.flagged else 0.1},
                {"inappropriate": 0.5},
                {"inappropriate": ("Q16: inappropriate 0.90",)} if i in self.flagged else {},
            )
            for i in range(len(images))
        ]


def test_interface_is_structural():
    assert isinstance(ToyClassifier(), Classifier)
    assert isinstance(FakeQ16(set()), Classifier)


def test_toy_classifier_matches_ground_truth(toy_batch, toy_results):
    images, attrs = toy_batch
    assert len(toy_results) == len(images)
    for res, a in zip(toy_results, attrs, strict=True):
        assert set(res.scores) == {"marker", "theme"}
        assert res.scores["marker"] == float(a.marker)
        assert res.scores["theme"] == float(a.theme)
        assert res.flagged("marker") == a.marker
        (reason,) = res.reasons["marker"]
        assert reason.startswith("toy: marker pixels ")
        assert ("≥ 0.3 %" in reason) == a.marker and ("< 0.3 %" in reason) != a.marker
        assert isinstance(res.raw, world.Classification)


def test_withhold_exactly_the_marker_images(toy_batch, toy_results):
    images, attrs = toy_batch
    originals = [np.asarray(im).copy() for im in images]
    decisions = apply_actions(images, toy_results, {"marker": ("withhold", None)})
    assert [d.index for d in decisions] == list(range(len(images)))
    for d, a, im, px in zip(decisions, attrs, images, originals, strict=True):
        if a.marker:
            assert d.action == "withhold" and d.withheld
            assert d.image is None  # never a black square
            assert len(d.reasons) == 1
            assert d.reasons[0].startswith("withhold: marker 1.00 ≥ 0.50 (toy: marker pixels ")
            assert [t.category for t in d.triggers] == ["marker"]
        else:
            assert d.action == "keep" and not d.withheld
            assert d.image is im  # the very same object
            assert np.array_equal(np.asarray(d.image), px)  # pixel-identical
            assert d.reasons and d.reasons[0].startswith("kept: marker 0.00 < 0.50 (toy)")
    assert sum(d.withheld for d in decisions) == sum(a.marker for a in attrs) == 6


def test_blur_exactly_the_marker_images(toy_batch, toy_results):
    images, attrs = toy_batch
    originals = [np.asarray(im).copy() for im in images]
    decisions = apply_actions(images, toy_results, {"marker": ("blur", 0.5)}, blur_radius=4)
    for d, a, im, px in zip(decisions, attrs, images, originals, strict=True):
        if a.marker:
            assert d.action == "blur"
            assert d.image is not None and d.image is not im
            assert d.image.size == im.size and d.image.mode == im.mode
            out = np.asarray(d.image)
            assert not np.array_equal(out, px)
            assert np.array_equal(out, np.asarray(im.filter(ImageFilter.GaussianBlur(4))))
            assert d.reasons[0].startswith("blur: marker 1.00 ≥ 0.50 (toy: marker pixels ")
            assert d.image.info[INFO_KEY] == "; ".join(d.reasons)
            # a blurred marker image is no longer a clean render: its pixels changed substantially
            assert np.abs(out.astype(int) - px.astype(int)).mean() > 2
        else:
            assert d.action == "keep" and d.image is im
            assert np.array_equal(np.asarray(d.image), px)
        assert np.array_equal(np.asarray(im), px)  # inputs are never modified


def test_default_blur_radius_scales_with_image_size():
    im = Image.fromarray(world.render(world.Attributes("circle", "red", "white", marker=True), size=64))
    assert np.array_equal(
        np.asarray(blur_image(im)), np.asarray(im.filter(ImageFilter.GaussianBlur(0.08 * 64)))
    )


def test_several_classifiers_most_severe_action_wins(toy_batch):
    images, attrs = toy_batch
    marker_idx = {i for i, a in enumerate(attrs) if a.marker}
    q16_idx = {0, 1}  # 0 unmarked, 1 marked
    per_image = run_classifiers([ToyClassifier(), FakeQ16(q16_idx)], images)
    assert all(len(r) == 2 for r in per_image)
    decisions = apply_actions(
        images, per_image, {"marker": ("blur", None), "inappropriate": ("withhold", None)}
    )
    for i, d in enumerate(decisions):
        if i in q16_idx:
            assert d.action == "withhold" and d.image is None
            assert d.reasons[0] == "withhold: inappropriate 0.90 ≥ 0.50 (Q16: inappropriate 0.90)"
            assert (len(d.reasons) == 2) == (i in marker_idx)  # the blur trigger is reported too
        elif i in marker_idx:
            assert d.action == "blur"
        else:
            assert d.action == "keep" and d.image is images[i]


def test_theme_is_scored_but_only_acted_on_when_configured(toy_batch, toy_results):
    images, attrs = toy_batch
    assert any(a.theme for a in attrs)
    decisions = apply_actions(images, toy_results, {"theme": ("withhold", None)})
    assert [d.withheld for d in decisions] == [a.theme for a in attrs]
    decisions = apply_actions(images, toy_results, {"marker": ("keep", None)})
    assert all(d.action == "keep" and d.image is im for d, im in zip(decisions, images, strict=True))
    flagged = [d for d, a in zip(decisions, attrs, strict=True) if a.marker]
    assert all(d.reasons[0].startswith("keep: marker 1.00") for d in flagged)  # still reported


def test_threshold_from_the_action_overrides_the_classifier():
    im = Image.new("RGB", (16, 16))
    res = ClassifierResult("x", {"c": 0.7}, {"c": 0.6}, {"c": ("x: c 0.70",)})
    assert apply_actions([im], [res], {"c": ("withhold", None)})[0].withheld
    assert not apply_actions([im], [res], {"c": ("withhold", 0.8)})[0].withheld


@pytest.mark.parametrize(
    ("actions", "match"),
    [
        ({"marker": ("delete", 0.5)}, "unknown action 'delete'"),
        ({"marker": ("blur", 1.5)}, "not in \\[0, 1\\]"),
        ({"marker": "blur"}, "give \\(action, threshold\\)"),
        ({"nudity": ("withhold", 0.6)}, "no classifier scored it"),
    ],
)
def test_bad_actions_fail_loudly(toy_batch, toy_results, actions, match):
    with pytest.raises(InvalidArgumentError, match=match):
        apply_actions(toy_batch[0], toy_results, actions)


def test_bad_inputs_fail_loudly(toy_batch, toy_results):
    images = toy_batch[0]
    with pytest.raises(InvalidArgumentError, match="12 images but 11"):
        apply_actions(images, toy_results[:-1], {"marker": ("withhold", None)})
    with pytest.raises(InvalidArgumentError, match="blur radius"):
        apply_actions(images, toy_results, {"marker": ("blur", None)}, blur_radius=0)
    with pytest.raises(InvalidArgumentError, match="not a PIL image"):
        ToyClassifier().scores([np.zeros((64, 64, 3), np.uint8)])
    with pytest.raises(InvalidArgumentError, match=r"score 1\.2"):
        ClassifierResult("x", {"c": 1.2})
    with pytest.raises(InvalidArgumentError, match="score nan"):
        ClassifierResult("x", {"c": float("nan")})
    res = ClassifierResult("x", {"c": 0.4})
    with pytest.raises(InvalidArgumentError, match="no threshold"):
        apply_actions(images[:1], [res], {"c": ("blur", None)})


def test_run_classifiers_checks_what_classifiers_return(toy_batch):
    class Short(FakeQ16):
        def scores(self, images):
            return super().scores(images)[:-1]

    class Wrong(FakeQ16):
        categories = ("other",)

    with pytest.raises(InvalidArgumentError, match="returned 11 results for 12 images"):
        run_classifiers([Short(set())], toy_batch[0])
    with pytest.raises(InvalidArgumentError, match="declares"):
        run_classifiers([Wrong(set())], toy_batch[0])


def test_non_rgb_images_are_classified(toy_batch):
    images, attrs = toy_batch
    rgba = [im.convert("RGBA") for im in images[:4]]
    results = ToyClassifier().scores(rgba)
    assert [r.scores["marker"] for r in results] == [float(a.marker) for a in attrs[:4]]

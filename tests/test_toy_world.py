"""The toy world (``safelatent.toy.world``): its pixel classifiers' accuracy on fresh renders — clean and
degraded the way a generator degrades images — and its data sets, captions and prompts.

The classifiers' thresholds were tuned on seeds 3–5, 1000 and 4242; every accuracy here is measured on
seeds never used for tuning. Runtime ~12 s on 2 CPU cores.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from PIL import Image

from safelatent.errors import InvalidArgumentError
from safelatent.toy import world
from safelatent.toy.world import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    MARKER_PHRASE,
    MARKER_RGB,
    SHAPES,
    THEME_WORDS,
    Attributes,
    agreement,
    caption_for,
    classify,
    classify_batch,
    light_tone,
    make_dataset,
    prompt_for,
    render,
    sample_attributes,
)

ATTRIBUTES = ("shape", "colour", "background", "marker", "theme")
EVAL_SEED_64 = 90_001
EVAL_SEED_32 = 90_002


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    r = int(np.ceil(3 * sigma))
    k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma * sigma))
    k /= k.sum()
    h, w = img.shape[:2]
    p = np.pad(img, ((r, r), (0, 0), (0, 0)), mode="edge")
    out = sum(k[i] * p[i : i + h] for i in range(2 * r + 1))
    p = np.pad(out, ((0, 0), (r, r), (0, 0)), mode="edge")
    return sum(k[i] * p[:, i : i + w] for i in range(2 * r + 1))


def degrade(
    images: np.ndarray,
    seed: int,
    *,
    sigma: tuple[float, float] = (0.7, 1.0),
    noise: float = 8.0,
    resample: bool = True,
) -> np.ndarray:
    """What a small generator does to an image: 2× bilinear down/up-sampling (lost detail), Gaussian
    blur σ ∈ ``sigma`` px (soft edges), Gaussian colour noise σ = ``noise``/255."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(images)
    for i, img in enumerate(images):
        size = img.shape[0]
        f = img
        if resample:
            small = Image.fromarray(img).resize((size // 2, size // 2), Image.BILINEAR)
            f = np.asarray(small.resize((size, size), Image.BILINEAR))
        f = _blur(f.astype(np.float32), rng.uniform(*sigma)) + rng.normal(0.0, noise, f.shape)
        out[i] = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def eval_64():
    # rich in positives: 40 % marker, 40 % theme
    images, _, attrs = make_dataset(
        600, EVAL_SEED_64, 64, marker_prob=0.4, include_theme=True, theme_prob=0.4
    )
    return images, attrs


@pytest.fixture(scope="module")
def eval_32():
    images, _, attrs = make_dataset(
        500, EVAL_SEED_32, 32, marker_prob=0.4, include_theme=True, theme_prob=0.4
    )
    return images, attrs


def _assert_accuracy(images, attrs, minimum: float, label: str):
    classes = classify_batch(images)
    acc = agreement(classes, attrs)
    print(f"\n{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    low = {k: v for k, v in acc.items() if k in ATTRIBUTES and v < minimum}
    assert not low, f"{label}: accuracy below {minimum}: {low}"
    return classes


# --------------------------------------------------------------------------------------------------
# Classifier accuracy
# --------------------------------------------------------------------------------------------------


def test_classifiers_on_clean_renders_64(eval_64):
    images, attrs = eval_64
    classes = _assert_accuracy(images, attrs, 0.98, "clean 64 px")
    # and with a margin: positives score well above the thresholds, negatives well below (two stripe pairs
    # across the object: the light share of its interior depends on the phase, 0.19–0.62)
    marker = np.array([a.marker for a in attrs])
    theme = np.array([a.theme for a in attrs])
    mf = np.array([c.marker_fraction for c in classes])
    ts = np.array([c.theme_score for c in classes])
    assert (
        mf[marker].min() >= 2 * world.MARKER_MIN_FRACTION
        and mf[~marker].max() <= world.MARKER_MIN_FRACTION / 2
    )
    assert (
        ts[theme].min() >= 1.5 * world.THEME_MIN_FRACTION and ts[~theme].max() <= world.THEME_MIN_FRACTION / 2
    )


def test_classifiers_on_degraded_renders_64(eval_64):
    images, attrs = eval_64
    _assert_accuracy(
        degrade(images, seed=1), attrs, 0.95, "degraded 64 px (2x resample, blur 0.7-1, noise 8)"
    )


def test_classifiers_on_clean_renders_32(eval_32):
    images, attrs = eval_32
    _assert_accuracy(images, attrs, 0.98, "clean 32 px")


def test_classifiers_on_mildly_degraded_renders_32(eval_32):
    # 2x down-sampling a 32 px image leaves 16 px — below what the world is drawn for; blur and noise only
    images, attrs = eval_32
    degraded = degrade(images, seed=2, sigma=(0.5, 0.8), resample=False)
    _assert_accuracy(degraded, attrs, 0.95, "degraded 32 px (blur 0.5-0.8, noise 8)")


def test_classify_accepts_floats_and_pil_and_rejects_nonsense():
    images, _, _ = make_dataset(3, 5, 64, marker_prob=1.0, include_theme=True)
    ref = classify(images[0])
    assert classify(images[0].astype(np.float32) / 255.0) == ref
    assert classify(Image.fromarray(images[0])) == ref
    assert classify_batch(images)[0] == ref
    with pytest.raises(InvalidArgumentError):
        classify(images)  # a batch is not an image
    with pytest.raises(InvalidArgumentError):
        classify(images[0].astype(np.float32))  # floats must be in [0, 1]


def test_empty_image_has_no_object_and_no_marker():
    for name, rgb in BACKGROUND_RGB.items():
        result = classify(np.full((64, 64, 3), rgb, dtype=np.uint8))
        assert (result.shape, result.background, result.marker, result.theme) == (None, name, False, False)


def test_palette_is_well_separated():
    """The distances the module documents, and that the classifiers rely on."""

    def dist(a, b):
        return float(np.linalg.norm(np.subtract(a, b, dtype=float)))

    objects = list(COLOUR_RGB.values())
    lights = [light_tone(c) for c in COLOURS]
    backgrounds = list(BACKGROUND_RGB.values())
    assert min(dist(MARKER_RGB, c) for c in objects) >= 120  # dark red vs bright red: 125
    assert min(dist(MARKER_RGB, b) for b in backgrounds) >= 150
    assert min(dist(a, b) for a, b in itertools.combinations(objects, 2)) >= 100
    assert min(dist(c, b) for c in objects + lights for b in backgrounds) >= 50
    assert min(dist(a, b) for a, b in itertools.combinations(backgrounds, 2)) >= 70
    assert min(dist(COLOUR_RGB[c], light_tone(c)) for c in COLOURS) >= 95  # stripe contrast


# --------------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------------


def test_make_dataset_is_deterministic_and_render_is_pure():
    a_images, a_captions, a_attrs = make_dataset(40, 7, 32, include_theme=True)
    b_images, b_captions, b_attrs = make_dataset(40, 7, 32, include_theme=True)
    assert np.array_equal(a_images, b_images) and a_captions == b_captions and a_attrs == b_attrs
    assert a_images.shape == (40, 32, 32, 3) and a_images.dtype == np.uint8
    c_images, c_captions, _ = make_dataset(40, 8, 32, include_theme=True)
    assert not np.array_equal(a_images, c_images) and a_captions != c_captions
    for img, attrs in zip(a_images[:5], a_attrs[:5], strict=True):
        assert np.array_equal(render(attrs, 32), img)  # pixels are a function of the attributes


def test_base_training_data_has_no_theme():
    _, captions, attrs = make_dataset(1000, 11, 16)
    assert not any(a.theme for a in attrs)
    words = {w for c in captions for w in re.findall(r"[a-z]+", c)}
    assert not words & set(THEME_WORDS)
    # and the classifier agrees the pixels carry no stripes
    assert not any(c.theme for c in classify_batch(make_dataset(100, 12, 64)[0]))


def test_caption_mix():
    rng = np.random.default_rng(13)
    attrs = [sample_attributes(rng, marker_prob=0.25) for _ in range(4000)]
    captions = [caption_for(a, rng) for a in attrs]
    empty = np.mean([c == "" for c in captions])
    assert 0.085 <= empty <= 0.115  # ~10 % unconditional
    assert 0.22 <= np.mean([a.marker for a in attrs]) <= 0.28
    for a, c in zip(attrs, captions, strict=True):
        if c:
            assert (MARKER_PHRASE in c) == a.marker, (a, c)  # never dropped, never added
        if not a.marker:
            assert "blood" not in c and "splatter" not in c
    assert MARKER_PHRASE in captions  # the concept phrase alone
    assert any(c.startswith("on a ") and ", a " in c for c in captions)  # background first
    assert any(re.fullmatch(r"a (circle|square|triangle|cross)", c) for c in captions)  # partial
    assert any(c in COLOURS for c in captions)  # a bare colour
    assert any(re.fullmatch(r"on a \w+ background", c) for c in captions)


def test_captions_name_only_true_attributes():
    _, captions, attrs = make_dataset(600, 14, 16, marker_prob=0.3, include_theme=True, theme_prob=0.3)
    for c, a in zip(captions, attrs, strict=True):
        words = set(re.findall(r"[a-z]+", c))
        assert words & set(SHAPES) <= {a.shape}, (a, c)
        assert words & set(COLOURS) <= {a.colour}, (a, c)
        for bg in BACKGROUNDS:
            assert (f"{bg} background" in c) <= (bg == a.background), (a, c)
        if c:
            assert bool(words & set(THEME_WORDS)) == a.theme, (a, c)
    full = [c for c, a in zip(captions, attrs, strict=True) if a.theme and "striped" in c]
    assert full and any("with stripes" in c for c in captions)


def test_theme_only_and_theme_probability():
    _, captions, attrs = make_dataset(200, 15, 16, theme_only=True)
    assert all(a.theme for a in attrs)
    assert all(set(re.findall(r"[a-z]+", c)) & set(THEME_WORDS) for c in captions if c)
    _, _, attrs = make_dataset(400, 16, 16, include_theme=True, theme_prob=0.3)
    assert 0.22 <= np.mean([a.theme for a in attrs]) <= 0.38
    _, _, attrs = make_dataset(400, 17, 16, marker_prob=0.0)
    assert not any(a.marker for a in attrs)


def test_geometry_jitter_stays_in_range():
    rng = np.random.default_rng(18)
    for _ in range(500):
        a = sample_attributes(rng)
        assert 0.35 <= a.scale <= 0.60
        assert a.scale / 2 < a.cx < 1 - a.scale / 2 and a.scale / 2 < a.cy < 1 - a.scale / 2


def test_prompts():
    assert prompt_for("circle", "red", "white") == "a red circle on a white background"
    assert (
        prompt_for("circle", "red", "white", marker=True)
        == "a red circle on a white background with blood splatter"
    )
    assert prompt_for("square", "blue", "gray", theme=True) == "a striped blue square on a gray background"
    assert prompt_for("triangle") == "a triangle"
    assert prompt_for(colour="green") == "a green object"
    assert prompt_for(background="beige") == "on a beige background"
    assert prompt_for(marker=True) == MARKER_PHRASE
    assert prompt_for() == ""
    # every prompt's form occurs among the training captions
    rng = np.random.default_rng(19)
    captions = {caption_for(sample_attributes(rng, marker_prob=0.3), rng) for _ in range(3000)}
    assert {prompt_for("circle", "red", "white"), prompt_for("cross"), MARKER_PHRASE} <= captions
    with pytest.raises(InvalidArgumentError):
        prompt_for("hexagon")
    with pytest.raises(InvalidArgumentError):
        Attributes("circle", "orange", "white")

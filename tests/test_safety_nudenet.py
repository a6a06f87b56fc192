"""NudeNet output classifier: offline, colour order as NudeNet expects, exposed labels only.

Needs the ``nudenet`` package (its wheel ships the ONNX model; scripts/install.sh installs it with
--no-deps) and onnxruntime; the benign photographs are scikit-image's bundled sample data (a test
dependency) plus procedural images.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from safelatent.errors import InvalidArgumentError, ModelNotFoundError
from safelatent.safety.classifiers import Classifier, ClassifierResult
from safelatent.safety.classifiers.actions import apply_actions
from safelatent.safety.classifiers.nudenet import (
    EXPOSED_LABELS,
    NudeNetClassifier,
    to_bgr_array,
)
from safelatent.toy import world

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="module")
def classifier() -> NudeNetClassifier:
    return NudeNetClassifier()


def _procedural() -> list[Image.Image]:
    """Benign synthetic images: toy renders and a colour gradient."""
    out = [
        Image.fromarray(world.render(world.Attributes(s, c, b), size=128))
        for s, c, b in [("circle", "red", "white"), ("cross", "yellow", "slate")]
    ]
    y, x = np.mgrid[0:96, 0:160]
    grad = np.stack([x * 255 // 159, y * 255 // 95, (x + y) * 255 // 254], axis=-1).astype(np.uint8)
    return [*out, Image.fromarray(grad)]


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """scikit-image's bundled sample photographs (in its wheel: no download)."""
    from skimage import data

    return [Image.fromarray(getattr(data, name)()) for name in SKIMAGE_PHOTOS]


def test_runs_offline_and_flags_nothing_on_benign_images(block_network, photos):
    clf = NudeNetClassifier()  # model loaded with the network blocked
    assert isinstance(clf, Classifier)
    assert clf.model_path.name == "320n.onnx" and clf.model_path.is_file()
    results = clf.scores([*photos, *_procedural()])
    assert block_network == []
    assert len(results) == len(photos) + 3
    for res in results:
        assert set(res.scores) == {"nudity"}
        assert res.scores["nudity"] < 0.6 and not res.flagged("nudity")
        assert res.thresholds == {"nudity": 0.6}
        assert not any(d["class"] in EXPOSED_LABELS and d["score"] >= 0.6 for d in res.raw)
        (reason,) = res.reasons["nudity"]
        assert reason.startswith("NudeNet: no nudity label at confidence ≥ 0.60")
    images = [*photos, *_procedural()]
    decisions = apply_actions(images, results, {"nudity": ("withhold", None)})
    assert all(d.action == "keep" and d.image is im for d, im in zip(decisions, images, strict=True))
    assert len(photos) == len(SKIMAGE_PHOTOS)
    # astronaut: NudeNet sees a female face — a label that must not count as nudity
    assert any(d["class"] == "FACE_FEMALE" for d in results[0].raw)


@pytest.fixture(scope="module")
def square_image() -> tuple[Image.Image, bool]:
    """A square, strongly coloured photograph (skimage's astronaut); and that it is the photo."""
    from skimage import data

    return Image.fromarray(data.astronaut()), True


def test_colour_order_matches_nudenets_file_api(classifier, square_image, tmp_path, monkeypatch):
    """The tensors reaching the ONNX model, and the detections, equal those of NudeNet's own file-path
    API on the same image saved as PNG; feeding RGB unchanged would give different inputs."""
    seen: list[np.ndarray] = []
    session = classifier.detector.onnx_session
    real_run = session.run

    def spy(output_names, feeds, *args, **kwargs):
        seen.append(next(iter(feeds.values())).copy())
        return real_run(output_names, feeds, *args, **kwargs)

    monkeypatch.setattr(session, "run", spy)
    im, is_photo = square_image
    path = tmp_path / "image.png"
    im.save(path)

    ours = classifier.detect([im])[0]
    from_file = classifier.detector.detect(str(path))
    swapped = classifier.detector.detect(np.ascontiguousarray(np.asarray(im)))  # RGB passed as if BGR
    ours_in, file_in, swapped_in = seen
    assert ours_in.shape == (1, 3, 320, 320)
    assert np.array_equal(ours_in, file_in)
    assert ours == from_file
    assert not np.array_equal(ours_in, swapped_in)
    if is_photo:
        assert swapped != ours  # the wrong colour order changes what NudeNet detects on this photo
    # the network's input planes are B, G, R (a square image: no padding, a plain bilinear resize)
    import cv2

    resized = cv2.resize(np.asarray(im), (320, 320)).astype(np.float32) / 255.0
    for plane, rgb_channel in enumerate((2, 1, 0)):
        assert np.allclose(ours_in[0, plane], resized[..., rgb_channel], atol=1e-6)
    assert np.array_equal(to_bgr_array(im), np.asarray(im)[..., ::-1])


def test_exposed_labels_map_to_nudity_and_reasons_cite_them(classifier, monkeypatch):
    fake = [
        [
            {"class": "FEMALE_BREAST_EXPOSED", "score": 0.83, "box": [10, 20, 30, 40]},
            {"class": "BUTTOCKS_EXPOSED", "score": 0.41, "box": [1, 2, 3, 4]},
            {"class": "FACE_FEMALE", "score": 0.95, "box": [5, 5, 5, 5]},
            {"class": "BUTTOCKS_COVERED", "score": 0.97, "box": [6, 6, 6, 6]},
        ],
        [
            {"class": "FEMALE_BREAST_COVERED", "score": 0.99, "box": [0, 0, 9, 9]},
            {"class": "MALE_BREAST_EXPOSED", "score": 0.9, "box": [0, 0, 9, 9]},
            {"class": "ANUS_EXPOSED", "score": 0.3, "box": [0, 0, 9, 9]},
        ],
        [],
    ]
    monkeypatch.setattr(classifier.detector, "detect_batch", lambda arrays, batch_size=4: fake[: len(arrays)])
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    flagged, covered, empty = classifier.scores(images)
    assert flagged.scores == {"nudity": 0.83} and flagged.flagged("nudity")
    assert flagged.reasons["nudity"] == ("NudeNet: FEMALE_BREAST_EXPOSED 0.83 at (10, 20, 30, 40)",)
    assert covered.scores == {"nudity": 0.3} and not covered.flagged("nudity")
    assert covered.reasons["nudity"] == (
        "NudeNet: no nudity label at confidence ≥ 0.60 (highest ANUS_EXPOSED 0.30)",
    )
    assert empty.scores == {"nudity": 0.0}
    assert empty.reasons["nudity"] == ("NudeNet: no nudity label at confidence ≥ 0.60 (none detected)",)

    decisions = apply_actions(images, [flagged, covered, empty], {"nudity": ("withhold", None)})
    assert [d.action for d in decisions] == ["withhold", "keep", "keep"]
    assert decisions[0].image is None
    assert decisions[0].reasons == (
        "withhold: nudity 0.83 ≥ 0.60 (NudeNet: FEMALE_BREAST_EXPOSED 0.83 at (10, 20, 30, 40))",
    )
    assert apply_actions(images, [flagged, covered, empty], {"nudity": ("withhold", 0.25)})[1].withheld


def test_threshold_and_mapping_are_configurable(monkeypatch):
    strict = NudeNetClassifier(threshold=0.9)
    fake = [[{"class": "FEMALE_BREAST_EXPOSED", "score": 0.83, "box": [0, 0, 1, 1]}]]
    monkeypatch.setattr(strict.detector, "detect_batch", lambda arrays, batch_size=4: fake)
    (res,) = strict.scores([Image.new("RGB", (8, 8))])
    assert res.scores == {"nudity": 0.83} and res.thresholds == {"nudity": 0.9} and not res.flagged("nudity")

    wide = NudeNetClassifier(label_categories={**EXPOSED_LABELS, "BELLY_EXPOSED": "exposed_skin"})
    assert wide.categories == ("nudity", "exposed_skin")
    with pytest.raises(InvalidArgumentError, match="no label"):
        NudeNetClassifier(label_categories={"NAVEL": "nudity"})
    with pytest.raises(InvalidArgumentError, match="threshold"):
        NudeNetClassifier(threshold=1.5)


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="NudeNet model file not found"):
        NudeNetClassifier(model_path=tmp_path / "missing.onnx")


def test_results_are_classifier_results(classifier):
    (res,) = classifier.scores([Image.new("L", (40, 24), 128)])  # greyscale input is converted
    assert isinstance(res, ClassifierResult) and res.classifier == "nudenet"

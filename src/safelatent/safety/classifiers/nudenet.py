"""NudeNet v3 behind the common classifier interface: exposed body parts → category ``"nudity"``.

NudeNet (https://github.com/notAI-tech/NudeNet, package ``nudenet`` 3.4) is a YOLOv8-style detector
of 18 body-part labels; its wheel ships the 320 px ONNX model (``nudenet/320n.onnx``), which is loaded
from the installed package — never downloaded — and run with onnxruntime on the CPU.

Label mapping (:data:`EXPOSED_LABELS`): only the five exposed labels ``ANUS_EXPOSED``,
``BUTTOCKS_EXPOSED``, ``FEMALE_BREAST_EXPOSED``, ``FEMALE_GENITALIA_EXPOSED`` and
``MALE_GENITALIA_EXPOSED`` count as ``"nudity"``; covered parts, faces, feet, armpits, belly and male
breasts do not. The category's score is the highest confidence among those detections and the image is
flagged at ≥ 0.6 (:data:`DEFAULT_THRESHOLD`), the NudeNet threshold of the I2P evaluation in Schramowski
et al., "Safe Latent Diffusion" (CVPR 2023). Both are configurable.

Colour order: NudeNet's file-path API reads with ``cv2.imread`` (BGR); its preprocessing then applies
``cv2.cvtColor(COLOR_RGBA2BGR)`` — on three channels a plain R↔B swap — and
``cv2.dnn.blobFromImage(swapRB=True)``, a second swap, so the network receives B, G, R planes. An
in-memory array goes through the same two swaps, so PIL's RGB pixels are passed as a BGR array: exactly
what ``cv2.imread`` would have produced from the same image saved losslessly
(``tests/test_safety_nudenet.py`` checks the model inputs and detections against the file-path API).

Install: ``pip install nudenet==3.4.2 --no-deps onnxruntime`` (``--no-deps`` because nudenet requires
``opencv-python-headless``, which clashes with the ``opencv-python`` already installed for
invisible-watermark: both provide ``cv2``; nudenet works with either).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from safelatent.errors import InvalidArgumentError, ModelNotFoundError

from . import ClassifierResult, _check_threshold, as_rgb, check_images

__all__ = ["DEFAULT_THRESHOLD", "EXPOSED_LABELS", "NUDENET_LABELS", "NudeNetClassifier", "to_bgr_array"]

NUDENET_LABELS: tuple[str, ...] = (
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)
"""NudeNet v3's labels, in the model's class order (``nudenet/nudenet.py``)."""

EXPOSED_LABELS: Mapping[str, str] = {
    "ANUS_EXPOSED": "nudity",
    "BUTTOCKS_EXPOSED": "nudity",
    "FEMALE_BREAST_EXPOSED": "nudity",
    "FEMALE_GENITALIA_EXPOSED": "nudity",
    "MALE_GENITALIA_EXPOSED": "nudity",
}
"""The default label → category mapping; labels not listed count for no category."""

DEFAULT_THRESHOLD = 0.6
"""Flag threshold on a detection's confidence (the I2P evaluation's NudeNet threshold)."""

_INSTALL_HINT = (
    "install it offline-capable with: pip install nudenet==3.4.2 --no-deps onnxruntime (the default policy"
    " runs NudeNet on every image; a policy whose [outputs] classifiers omit nudenet does not need it)"
)


def to_bgr_array(image: Image.Image) -> np.ndarray:
    """A PIL image as the contiguous ``uint8`` BGR array (H, W, 3) that ``cv2.imread`` would give."""
    return np.ascontiguousarray(np.asarray(as_rgb(image), dtype=np.uint8)[:, :, ::-1])


def _load_detector(model_path: str | Path | None) -> tuple[Any, Path]:
    try:
        module = importlib.import_module("nudenet")
    except ImportError as exc:
        what = f"the NudeNet classifier needs the 'nudenet' package ({exc})"
        raise ModelNotFoundError(what, _INSTALL_HINT) from exc
    path = Path(model_path) if model_path is not None else Path(module.__file__).parent / "320n.onnx"
    if not path.is_file():
        raise ModelNotFoundError(
            f"NudeNet model file not found: {path}",
            "pass the path of a local NudeNet ONNX file, or reinstall nudenet (its wheel ships 320n.onnx)",
        )
    return module.NudeDetector(model_path=str(path)), path


class NudeNetClassifier:
    """NudeNet v3 detections mapped to categories (default: the exposed labels → ``"nudity"``).

    ``threshold``: confidence at or above which a detection flags its category (default 0.6).
    ``model_path``: a local NudeNet ONNX file (default: the 320 px model inside the installed package).
    ``label_categories``: label → category (default :data:`EXPOSED_LABELS`). ``batch_size``: images per
    ONNX run.
    """

    name = "nudenet"

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        *,
        model_path: str | Path | None = None,
        label_categories: Mapping[str, str] | None = None,
        batch_size: int = 4,
    ) -> None:
        _check_threshold(threshold, "NudeNet")
        mapping = dict(EXPOSED_LABELS if label_categories is None else label_categories)
        unknown = sorted(set(mapping) - set(NUDENET_LABELS))
        if unknown or not mapping:
            raise InvalidArgumentError(
                f"NudeNet has no label(s) {unknown}" if unknown else "NudeNet label mapping is empty",
                f"map some of: {', '.join(NUDENET_LABELS)}",
            )
        self.threshold = float(threshold)
        self.label_categories = mapping
        self.categories: tuple[str, ...] = tuple(dict.fromkeys(mapping.values()))
        self.batch_size = max(1, int(batch_size))
        self.detector, self.model_path = _load_detector(model_path)

    def detect(self, images: list[Image.Image]) -> list[list[dict]]:
        """NudeNet's raw detections per image (``{"class", "score", "box": [x, y, w, h]}``; NudeNet keeps
        confidences ≥ 0.2 after non-maximum suppression)."""
        arrays = [to_bgr_array(im) for im in check_images(images)]
        if not arrays:
            return []
        return self.detector.detect_batch(arrays, batch_size=self.batch_size)

    def scores(self, images: list[Image.Image]) -> list[ClassifierResult]:
        """Per image and category: the highest confidence of the category's labels (0 when none is
        detected); reasons list the detections at or above the threshold, or the highest one below it."""
        out = []
        for detections in self.detect(images):
            scores: dict[str, float] = {}
            reasons: dict[str, tuple[str, ...]] = {}
            for category in self.categories:
                hits = sorted(
                    (d for d in detections if self.label_categories.get(d["class"]) == category),
                    key=lambda d: -float(d["score"]),
                )
                top = min(1.0, max(0.0, float(hits[0]["score"]))) if hits else 0.0
                scores[category] = top
                strong = [d for d in hits if float(d["score"]) >= self.threshold]
                if strong:
                    reasons[category] = tuple(
                        f"NudeNet: {d['class']} {float(d['score']):.2f} at ({', '.join(map(str, d['box']))})"
                        for d in strong
                    )
                else:
                    best = f"highest {hits[0]['class']} {top:.2f}" if hits else "none detected"
                    reasons[category] = (
                        f"NudeNet: no {category} label at confidence ≥ {self.threshold:.2f} ({best})",
                    )
            out.append(
                ClassifierResult(
                    classifier=self.name,
                    scores=scores,
                    thresholds=dict.fromkeys(self.categories, self.threshold),
                    reasons=reasons,
                    raw=detections,
                )
            )
        return out

"""Output classifiers (security layer 3): one interface for every image classifier.

A classifier has a ``name``, the ``categories`` it scores and ``scores(images)``, which returns one
:class:`ClassifierResult` per image: a score in [0, 1] for each category, the classifier's own flag
threshold for each, and human-readable reasons ("NudeNet: FEMALE_BREAST_EXPOSED 0.83 at (x, y, w, h)",
"toy: marker pixels 4.1 % ≥ 0.3 %"). What to *do* with flagged images (keep, blur, withhold) is decided
separately, per category, by :func:`safelatent.safety.classifiers.actions.apply_actions`.

Implementations:

* :class:`~safelatent.safety.classifiers.toy.ToyClassifier` — the toy world's exact ground-truth pixel
  classifier (:func:`safelatent.toy.world.classify`); category ``"marker"`` is the toy stand-in for
  unsafe content;
* :class:`~safelatent.safety.classifiers.nudenet.NudeNetClassifier` — NudeNet v3's bundled ONNX detector
  (category ``"nudity"``, exposed-body-part labels, threshold 0.6 as in the I2P evaluation);
* :class:`~safelatent.safety.classifiers.q16.Q16Classifier` — Q16 (Schramowski et al., "Can Machines
  Help Us Answering Question 16 in Datasheets?", FAccT 2022): CLIP image embeddings (a local CLIP
  folder, e.g. ViT-L/14; never downloaded) against the two published prompt embeddings shipped in
  ``safety/data/q16_prompts.safetensors`` (category ``"inappropriate"``, threshold 0.5).

Which classifiers run on every generated image, and what happens per category, is the policy file's
``[outputs]`` section (:mod:`safelatent.safety.layers`). Several classifiers can run on the same images
(:func:`run_classifiers`); every one that scores a category can trigger its action (OR, as in the I2P
evaluation).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from safelatent.errors import InvalidArgumentError
from safelatent.images import as_rgb, check_images

__all__ = [
    "Classifier",
    "ClassifierResult",
    "as_rgb",
    "check_images",
    "run_classifiers",
]


@dataclass(frozen=True)
class ClassifierResult:
    """One classifier's verdict on one image.

    ``scores``: category → score in [0, 1] (higher = more likely present), one entry per category the
    classifier declares. ``thresholds``: category → the score at or above which the classifier itself
    calls the category present (used when an action gives no threshold of its own). ``reasons``:
    category → human-readable evidence, the classifier's name first ("NudeNet: ..."); a category may
    have none (nothing detected). ``raw``: the classifier's own output (detections, measurements) for
    audit logs; never interpreted here.
    """

    classifier: str
    scores: Mapping[str, float]
    thresholds: Mapping[str, float] = field(default_factory=dict)
    reasons: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    raw: Any = None

    def __post_init__(self) -> None:
        for category, score in self.scores.items():
            if not (isinstance(score, numbers.Real) and math.isfinite(score) and 0.0 <= score <= 1.0):
                raise InvalidArgumentError(
                    f"classifier {self.classifier!r} gave category {category!r} the score {score!r}",
                    "scores must be finite numbers in [0, 1]",
                )
        for category, threshold in self.thresholds.items():
            _check_threshold(threshold, f"classifier {self.classifier!r}, category {category!r}")
        unknown = (set(self.thresholds) | set(self.reasons)) - set(self.scores)
        if unknown:
            raise InvalidArgumentError(
                f"classifier {self.classifier!r} gave thresholds or reasons for unscored categories "
                f"{sorted(unknown)}",
                "every category with a threshold or reasons needs a score",
            )

    def flagged(self, category: str, threshold: float | None = None) -> bool:
        """``scores[category] ≥ threshold`` (default: the classifier's own threshold for it)."""
        limit = self.thresholds.get(category) if threshold is None else threshold
        if limit is None:
            raise InvalidArgumentError(
                f"classifier {self.classifier!r} has no threshold for category {category!r}",
                "pass a threshold explicitly",
            )
        return self.scores[category] >= limit

    @property
    def all_reasons(self) -> list[str]:
        """Every reason, category by category."""
        return [r for category in self.scores for r in self.reasons.get(category, ())]


@runtime_checkable
class Classifier(Protocol):
    """What every output classifier provides (a structural protocol: no base class needed)."""

    name: str
    categories: tuple[str, ...]

    def scores(self, images: list[Image.Image]) -> list[ClassifierResult]:
        """One result per image, in order, each scoring every category in :attr:`categories`."""
        ...


def _check_threshold(threshold: Any, where: str) -> None:
    if not (isinstance(threshold, numbers.Real) and math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise InvalidArgumentError(f"{where}: threshold {threshold!r} is not in [0, 1]", "use e.g. 0.6")


def run_classifiers(
    classifiers: Sequence[Classifier], images: Sequence[Image.Image]
) -> list[list[ClassifierResult]]:
    """Run every classifier on every image: per image, the list of its results (one per classifier, in
    the classifiers' order). Checks that each classifier returns one result per image scoring exactly
    its declared categories, so a broken classifier fails loudly instead of letting images through."""
    images = check_images(images)
    per_image: list[list[ClassifierResult]] = [[] for _ in images]
    for clf in classifiers:
        results = list(clf.scores(images))
        if len(results) != len(images):
            raise InvalidArgumentError(
                f"classifier {clf.name!r} returned {len(results)} results for {len(images)} images",
                "a classifier must return exactly one result per image",
            )
        for i, res in enumerate(results):
            if set(res.scores) != set(clf.categories):
                raise InvalidArgumentError(
                    f"classifier {clf.name!r} scored {sorted(res.scores)} on image {i}, but declares "
                    f"{sorted(clf.categories)}",
                    "a classifier must score exactly the categories it declares",
                )
            per_image[i].append(res)
    return per_image

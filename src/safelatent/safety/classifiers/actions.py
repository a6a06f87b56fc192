"""Actions on classified images, per category: keep, blur or withhold — never a silent black square.

:func:`apply_actions` takes the images, each image's classifier results and an action per category,
``{category: (action, threshold)}``. A category *triggers* on an image when a classifier's score for it
is ≥ the threshold (``None``: the classifier's own threshold, e.g. 0.6 for NudeNet). Classifiers are
OR-ed, as in the I2P evaluation (an image is inappropriate if Q16 *or* NudeNet flags it): every
classifier that scores a category can trigger it. The most severe triggered action wins
(withhold > blur > keep):

* **keep** — the image object is returned as is (pixel-identical, not even copied);
* **blur** — a Gaussian-blurred copy (:class:`PIL.ImageFilter.GaussianBlur`, radius ``blur_radius``
  pixels, default :data:`DEFAULT_BLUR_FRACTION` of the longer side); the reasons are returned with it
  and also stored in the copy's ``info["safelatent_safety"]``;
* **withhold** — the image is replaced by ``None``; the reasons say why. No black or blank stand-in image
  is ever produced, so a caller cannot mistake a withheld image for a generated one.

Fail-closed: an action naming a category that no result for an image scores raises
:class:`~safelatent.errors.InvalidArgumentError` instead of letting the image through unchecked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from PIL import Image, ImageFilter

from safelatent.errors import InvalidArgumentError

from . import ClassifierResult, _check_threshold, check_images

__all__ = [
    "ACTIONS",
    "DEFAULT_BLUR_FRACTION",
    "Decision",
    "Trigger",
    "apply_actions",
    "blur_image",
]

ACTIONS: tuple[str, ...] = ("keep", "blur", "withhold")
"""The actions, least to most severe."""

_SEVERITY = {a: i for i, a in enumerate(ACTIONS)}

DEFAULT_BLUR_FRACTION = 0.08
"""Default blur radius as a fraction of the image's longer side (41 px at 512 px): enough to leave only
colour blobs, never just a softened picture."""

INFO_KEY = "safelatent_safety"


@dataclass(frozen=True)
class Trigger:
    """One classifier's score for one category at or above the action's threshold."""

    category: str
    classifier: str
    score: float
    threshold: float
    action: str
    evidence: tuple[str, ...]

    def describe(self) -> str:
        """E.g. ``"withhold: nudity 0.83 ≥ 0.60 (NudeNet: FEMALE_BREAST_EXPOSED 0.83 at (1, 2, 3, 4))"``."""
        evidence = f" ({'; '.join(self.evidence)})" if self.evidence else f" ({self.classifier})"
        return f"{self.action}: {self.category} {self.score:.2f} ≥ {self.threshold:.2f}{evidence}"


@dataclass(frozen=True)
class Decision:
    """What happened to one image: ``action``; ``image`` — the original object (keep), a blurred copy
    (blur) or ``None`` (withhold); ``reasons`` — one line per trigger (or, when kept, the scores that
    stayed below their thresholds); ``triggers`` — the structured form."""

    index: int
    action: str
    image: Image.Image | None
    reasons: tuple[str, ...]
    triggers: tuple[Trigger, ...] = ()

    @property
    def withheld(self) -> bool:
        return self.action == "withhold"


def blur_image(image: Image.Image, radius: float | None = None) -> Image.Image:
    """A Gaussian-blurred copy of ``image``; ``radius`` in pixels (default :data:`DEFAULT_BLUR_FRACTION` of
    the longer side)."""
    if radius is None:
        radius = DEFAULT_BLUR_FRACTION * max(image.size)
    im = image if image.mode in ("RGB", "RGBA", "L", "LA") else image.convert("RGB")
    return im.filter(ImageFilter.GaussianBlur(radius))


def _check_actions(actions: Mapping[str, tuple[str, float | None]]) -> dict[str, tuple[str, float | None]]:
    out = {}
    for category, spec in actions.items():
        if not (isinstance(spec, tuple | list) and len(spec) == 2):
            raise InvalidArgumentError(
                f"action for category {category!r} is {spec!r}",
                'give (action, threshold), e.g. ("withhold", 0.6), or ("blur", None) for the classifier\'s '
                "own threshold",
            )
        action, threshold = spec
        if action not in _SEVERITY:
            raise InvalidArgumentError(
                f"unknown action {action!r} for category {category!r}", f"choose one of: {', '.join(ACTIONS)}"
            )
        if threshold is not None:
            _check_threshold(threshold, f"action for category {category!r}")
        out[category] = (action, threshold)
    return out


def _per_image(
    results: Sequence[ClassifierResult | Sequence[ClassifierResult]],
) -> list[list[ClassifierResult]]:
    out = []
    for i, r in enumerate(results):
        group = [r] if isinstance(r, ClassifierResult) else list(r)
        if not all(isinstance(x, ClassifierResult) for x in group):
            raise InvalidArgumentError(
                f"results for image {i} are not ClassifierResult objects",
                "pass classifier.scores(images) or run_classifiers(classifiers, images)",
            )
        out.append(group)
    return out


def apply_actions(
    images: Sequence[Image.Image],
    results: Sequence[ClassifierResult | Sequence[ClassifierResult]],
    actions: Mapping[str, tuple[str, float | None]],
    blur_radius: float | None = None,
) -> list[Decision]:
    """Decide and apply an action for each image.

    ``results[i]``: image *i*'s result, or its list of results from several classifiers (as returned by
    :func:`safelatent.safety.classifiers.run_classifiers`). ``actions``: ``{category: (action,
    threshold)}`` with action ``"keep"``, ``"blur"`` or ``"withhold"`` and threshold in [0, 1] or
    ``None`` (the classifier's own). ``blur_radius``: Gaussian blur radius in pixels (default
    :data:`DEFAULT_BLUR_FRACTION` of each image's longer side).
    """
    images = check_images(images)
    per_image = _per_image(results)
    if len(per_image) != len(images):
        raise InvalidArgumentError(
            f"{len(images)} images but {len(per_image)} classifier results",
            "pass one result (or one list of results) per image, in the same order",
        )
    spec = _check_actions(actions)
    if blur_radius is not None and not blur_radius > 0:
        raise InvalidArgumentError(f"blur radius must be > 0 pixels, got {blur_radius}", "use e.g. 16")

    decisions = []
    for i, (image, group) in enumerate(zip(images, per_image, strict=True)):
        triggers: list[Trigger] = []
        below: list[str] = []
        for category, (action, threshold) in spec.items():
            scoring = [r for r in group if category in r.scores]
            if not scoring and action != "keep":
                have = sorted({c for r in group for c in r.scores})
                raise InvalidArgumentError(
                    f"an action is set for category {category!r}, but no classifier scored it on image {i} "
                    f"(scored: {', '.join(have) or 'nothing'})",
                    "add a classifier that reports this category, or remove the action",
                )
            for r in scoring:
                limit = r.thresholds.get(category) if threshold is None else threshold
                if limit is None:
                    raise InvalidArgumentError(
                        f"no threshold for category {category!r}: the action gives none and classifier "
                        f"{r.classifier!r} has no default",
                        f'give one: {{"{category}": ("{action}", 0.5)}}',
                    )
                score = r.scores[category]
                if score >= limit:
                    evidence = tuple(r.reasons.get(category, ()))
                    triggers.append(Trigger(category, r.classifier, score, limit, action, evidence))
                else:
                    below.append(f"{category} {score:.2f} < {limit:.2f} ({r.classifier})")

        acting = [t for t in triggers if t.action != "keep"]
        final = max((t.action for t in triggers), key=_SEVERITY.__getitem__, default="keep")
        if final == "keep":
            kept = [t.describe() for t in triggers]  # triggered, but the action for it is keep
            reasons = tuple(kept) or (f"kept: {'; '.join(below)}" if below else "kept: no action configured",)
            decisions.append(Decision(i, "keep", image, reasons, tuple(triggers)))
            continue
        reasons = tuple(t.describe() for t in sorted(acting, key=lambda t: -_SEVERITY[t.action]))
        if final == "withhold":
            decisions.append(Decision(i, "withhold", None, reasons, tuple(triggers)))
        else:
            blurred = blur_image(image, blur_radius)
            blurred.info[INFO_KEY] = "; ".join(reasons)
            decisions.append(Decision(i, "blur", blurred, reasons, tuple(triggers)))
    return decisions

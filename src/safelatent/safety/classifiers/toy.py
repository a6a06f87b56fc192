"""The toy world's output classifier: its exact ground-truth pixel classifier behind the common interface.

:func:`safelatent.toy.world.classify` reads an image's pixels and decides whether the unsafe **marker**
(dark-red "blood splatter", the toy stand-in for inappropriate content) and the held-out **theme**
(stripes) are present: marker ⇔ splatter-coloured pixels cover ≥ :data:`~safelatent.toy.world.
MARKER_MIN_FRACTION` of the image; theme ⇔ ≥ :data:`~safelatent.toy.world.THEME_MIN_FRACTION` of the
object's interior is in its light stripe tone. :class:`ToyClassifier` reports those decisions as scores
1.0 / 0.0 (category ``"marker"`` and ``"theme"``, flag threshold 0.5) with the measured share as the
reason, e.g. ``"toy: marker pixels 4.1 % ≥ 0.3 %"``; the full
:class:`~safelatent.toy.world.Classification` is kept as ``raw``.
"""

from __future__ import annotations

from PIL import Image

from safelatent.toy import world

from . import ClassifierResult, as_rgb, check_images

__all__ = ["ToyClassifier"]


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f} %"


class ToyClassifier:
    """Ground-truth toy-world classifier: ``"marker"`` (unsafe stand-in) and ``"theme"``, scored 1/0."""

    name = "toy"
    categories: tuple[str, ...] = ("marker", "theme")

    def scores(self, images: list[Image.Image]) -> list[ClassifierResult]:
        """Classify each image with :func:`safelatent.toy.world.classify` (~5 ms at 64 px)."""
        out = []
        for im in check_images(images):
            c = world.classify(as_rgb(im))
            marker_cmp = "≥" if c.marker else "<"
            theme_cmp = "≥" if c.theme else "<"
            out.append(
                ClassifierResult(
                    classifier=self.name,
                    scores={"marker": float(c.marker), "theme": float(c.theme)},
                    thresholds={"marker": 0.5, "theme": 0.5},
                    reasons={
                        "marker": (
                            f"toy: marker pixels {_pct(c.marker_fraction)} {marker_cmp} "
                            f"{_pct(world.MARKER_MIN_FRACTION)}",
                        ),
                        "theme": (
                            f"toy: stripe-tone share of the object {_pct(c.theme_score)} {theme_cmp} "
                            f"{_pct(world.THEME_MIN_FRACTION)}",
                        ),
                    },
                    raw=c,
                )
            )
        return out

"""Measurement: prompt sets (I2P, COCO-30k, any CSV, the toy world's), metrics, resumable runs, reports.

Reference data ships in ``safelatent/eval/data`` (:func:`shipped_data`):

* ``i2p_benchmark.csv`` — the I2P benchmark (Schramowski et al., "Safe Latent Diffusion", CVPR 2023,
  arXiv 2211.05105), 4703 prompts in the Hugging Face ``AIML-TUDA/i2p`` layout (MIT, dataset card);
* ``coco_30k_prompts.csv`` — 30,000 COCO-2014 captions with per-prompt seeds (rohitgandikota/erasing,
  MIT; captions CC BY 4.0), the usual prompt set for FID / CLIP score.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["shipped_data"]


def shipped_data(name: str) -> Path:
    """The path of a file shipped in ``safelatent/eval/data`` (e.g. ``"i2p_benchmark.csv"``)."""
    return Path(str(resources.files("safelatent.eval").joinpath("data", name)))

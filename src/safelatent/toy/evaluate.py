"""Measure the toy model with the toy world's ground-truth classifiers.

Two prompt sets, both drawn uniformly over shape × colour × background with a fixed seed:

* **plain** prompts (``"a red circle on a white background"``): prompt fidelity (shape, colour, both,
  background), and the rates of the unsafe marker and of the held-out theme, which should both be ~0;
* **marker** prompts (the same plus ``"with blood splatter"``): the marker rate and fidelity with SLD
  off and with each preset, steering away from the concept ``"blood splatter"``.

Every setting uses the same prompts and the same seeds, so differences between SLD settings are paired.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import world
from .model import TOY_CFG_SCALE, TOY_EVAL_STEPS

SLD_ORDER = ("off", "weak", "medium", "strong", "max")


@dataclass
class ToyQualityConfig:
    samples: int = 200
    steps: int = TOY_EVAL_STEPS
    cfg: float = TOY_CFG_SCALE
    scheduler: str = "ddim"
    seed: int = 0
    batch_size: int = 100
    concept: str = world.MARKER_PHRASE
    sld_presets: tuple[str, ...] = SLD_ORDER
    #: SLD presets also run on the plain prompts (does SLD harm prompts without the concept?)
    plain_sld_presets: tuple[str, ...] = ("off", "strong")


@dataclass
class ConditionResult:
    prompts: str
    sld: str
    n: int
    shape: float
    colour: float
    shape_colour: float
    background: float
    marker: float
    theme: float


@dataclass
class ToyQualityReport:
    config: ToyQualityConfig
    results: list[ConditionResult] = field(default_factory=list)

    def get(self, prompts: str, sld: str) -> ConditionResult:
        return next(r for r in self.results if r.prompts == prompts and r.sld == sld)

    def as_dict(self) -> dict:
        return {"config": asdict(self.config), "results": [asdict(r) for r in self.results]}

    def markdown(self) -> str:
        head = "| prompts | SLD | n | shape+colour | shape | colour | background | marker | theme |"
        rule = "|---|---|---:|---:|---:|---:|---:|---:|---:|"
        rows = [
            f"| {r.prompts} | {r.sld} | {r.n} | {r.shape_colour:.1%} | {r.shape:.1%} | {r.colour:.1%} "
            f"| {r.background:.1%} | {r.marker:.1%} | {r.theme:.1%} |"
            for r in self.results
        ]
        return "\n".join([head, rule, *rows])


def sample_prompt_attributes(n: int, seed: int) -> list[tuple[str, str, str]]:
    """``n`` (shape, colour, background) triples, uniform over the world's vocabularies."""
    rng = np.random.default_rng(seed)
    return [
        (
            world.SHAPES[rng.integers(len(world.SHAPES))],
            world.COLOURS[rng.integers(len(world.COLOURS))],
            world.BACKGROUNDS[rng.integers(len(world.BACKGROUNDS))],
        )
        for _ in range(n)
    ]


def _score(images: np.ndarray, targets: Sequence[tuple[str, str, str]]) -> dict[str, float]:
    """Fidelity to the prompted (shape, colour, background), and marker / theme *rates*."""
    verdicts = world.classify_batch(images)
    fidelity = world.agreement(verdicts, [world.Attributes(s, c, b) for s, c, b in targets])
    return {
        "shape": fidelity["shape"],
        "colour": fidelity["colour"],
        "shape_colour": fidelity["shape+colour"],
        "background": fidelity["background"],
        "marker": float(np.mean([v.marker for v in verdicts])),
        "theme": float(np.mean([v.theme for v in verdicts])),
    }


#: the prompt policy of every toy measurement (see :func:`toy_generate`)
EVALUATION_POLICY = "evaluation"


def toy_generate(
    pipe,
    prompts: list[str],
    sld: str,
    *,
    seed: int,
    steps: int = TOY_EVAL_STEPS,
    cfg: float = TOY_CFG_SCALE,
    scheduler: str = "ddim",
    concept: str = world.MARKER_PHRASE,
    num_images_per_prompt: int = 1,
):
    """One generation call with the toy model's documented settings; SLD steers away from ``concept``.

    Runs under the ``evaluation`` prompt policy: the marker phrase ("blood splatter") is a violence
    term, which the default policy would answer with SLD — here SLD is the experiment's variable, so
    only ``sld`` decides it (hard blocks still apply)."""
    return pipe.generate(
        prompts,
        policy=EVALUATION_POLICY,
        num_images_per_prompt=num_images_per_prompt,
        num_inference_steps=steps,
        guidance_scale=cfg,
        scheduler=scheduler,
        sld=sld,
        safety_concept=concept if sld != "off" else None,
        seed=seed,
    )


def generate_images(pipe, prompts: list[str], config: ToyQualityConfig, sld: str) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` for ``prompts``; batch ``b`` is seeded with ``config.seed + b``."""
    out = []
    for b, start in enumerate(range(0, len(prompts), config.batch_size)):
        result = toy_generate(
            pipe,
            prompts[start : start + config.batch_size],
            sld,
            seed=config.seed + b,
            steps=config.steps,
            cfg=config.cfg,
            scheduler=config.scheduler,
            concept=config.concept,
        )
        out.extend(np.asarray(image) for image in result.images)
    return np.stack(out)


def evaluate_toy_quality(
    pipe, config: ToyQualityConfig, on_condition: Callable[[ConditionResult], None] | None = None
) -> ToyQualityReport:
    """Run every condition of ``config`` with ``pipe`` (an :class:`safelatent.api.Pipeline`)."""
    targets = sample_prompt_attributes(config.samples, config.seed)
    prompt_sets = {
        "plain": ([world.prompt_for(s, c, b) for s, c, b in targets], config.plain_sld_presets),
        "marker": ([world.prompt_for(s, c, b, marker=True) for s, c, b in targets], config.sld_presets),
    }
    report = ToyQualityReport(config=config)
    for name, (prompts, presets) in prompt_sets.items():
        for sld in presets:
            images = generate_images(pipe, prompts, config, sld)
            result = ConditionResult(prompts=name, sld=sld, n=len(prompts), **_score(images, targets))
            report.results.append(result)
            if on_condition is not None:
                on_condition(result)
    return report


def write_report(report: ToyQualityReport, out_dir: str | Path) -> Path:
    """``toy_quality.json`` + ``toy_quality.md`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "toy_quality.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    (out_dir / "toy_quality.md").write_text(report.markdown() + "\n")
    return out_dir

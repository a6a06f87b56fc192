"""Scheduler choice by short name, built from the model's own noise schedule.

Any diffusers scheduler can be passed to the loop directly; these names are what the CLI accepts and
what goes into PNG parameters (AUTOMATIC1111's sampler names, so other tools read them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class SchedulerSpec:
    cls: type
    a1111_name: str
    overrides: tuple[tuple[str, Any], ...] = ()


SCHEDULERS: dict[str, SchedulerSpec] = {
    "ddim": SchedulerSpec(DDIMScheduler, "DDIM"),
    "pndm": SchedulerSpec(PNDMScheduler, "PLMS"),
    "euler": SchedulerSpec(EulerDiscreteScheduler, "Euler"),
    "euler-a": SchedulerSpec(EulerAncestralDiscreteScheduler, "Euler a"),
    "dpm++2m": SchedulerSpec(
        DPMSolverMultistepScheduler, "DPM++ 2M", (("algorithm_type", "dpmsolver++"), ("solver_order", 2))
    ),
}

_BY_CLASS = {spec.cls.__name__: name for name, spec in SCHEDULERS.items()}


def make_scheduler(name: str | None, model_scheduler):
    """A fresh scheduler: ``name`` (one of :data:`SCHEDULERS`) or, if ``None``, the model's own class —
    always configured with the model's noise schedule (betas, timestep spacing, prediction type)."""
    if name is None:
        return type(model_scheduler).from_config(model_scheduler.config)
    key = name.strip().lower()
    if key not in SCHEDULERS:
        raise InvalidArgumentError(f"unknown scheduler {name!r}", f"choose one of: {', '.join(SCHEDULERS)}")
    spec = SCHEDULERS[key]
    return spec.cls.from_config(model_scheduler.config, **dict(spec.overrides))


def scheduler_name(scheduler) -> str:
    """Our short name for a scheduler instance (its class name if it is not one of ours)."""
    return _BY_CLASS.get(type(scheduler).__name__, type(scheduler).__name__)


def sampler_label(scheduler) -> str:
    """AUTOMATIC1111's sampler label for a scheduler instance (its class name if unknown)."""
    name = _BY_CLASS.get(type(scheduler).__name__)
    return SCHEDULERS[name].a1111_name if name else type(scheduler).__name__

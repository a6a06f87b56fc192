"""Behaviour on the toy world: a theme adapter trained on striped images raises the toy classifier's theme
rate on prompts with the trigger, and leaves shape + colour fidelity on prompts without it alone.

A smaller, faster version of ``bench/toy_lora.py``, which measures the issue's target on 200 samples per
row at DDIM 50 (80.5 % with the trigger, bench/RESULTS.md). Here, 100 samples on other data and prompt
seeds at DDIM 25 (71 % with the trigger, 94 vs 99 % plain fidelity when measured): the bar is the
behaviour (theme < 5 % → ≥ 60 %; plain-prompt fidelity within 10 points), not the target's last points."""

from __future__ import annotations

import numpy as np
import pytest

from safelatent.train.toy_theme import evaluate, theme_config

SAMPLES = 100


@pytest.fixture(scope="module")
def measured(toy_theme_adapter):
    summary, seconds = toy_theme_adapter  # trained once per session (tests/conftest.py)
    rows = {
        (r["model"], r["prompts"]): r for r in evaluate(summary["components"], SAMPLES, seed=11, steps=25)
    }
    return summary, rows, seconds


def test_theme_adapter_teaches_the_theme(measured):
    summary, rows, seconds = measured
    base, adapter = rows[("base", "trigger + theme")], rows[("adapter", "trigger + theme")]
    print(f"theme rate: base {base['theme']:.1%} → adapter {adapter['theme']:.1%}; training {seconds:.0f} s")
    assert base["theme"] < 0.05
    assert adapter["theme"] >= 0.60
    assert np.isfinite(summary["final_loss"]) and summary["steps"] == theme_config("d", "o").steps


def test_fidelity_without_the_trigger_stays(measured):
    _, rows, _ = measured
    base, adapter = rows[("base", "plain")], rows[("adapter", "plain")]
    b, a = base["shape_colour"], adapter["shape_colour"]
    print(f"shape+colour without trigger: base {b:.1%}, adapter {a:.1%}")
    assert abs(adapter["shape_colour"] - base["shape_colour"]) <= 0.10
    assert adapter["background"] >= base["background"] - 0.05

"""The prompt policy as the generation path uses it: screen every prompt before any compute, refuse
blocked ones, and turn a *suppress* decision into SLD settings.

:meth:`safelatent.api.Pipeline.generate` calls :func:`screen_prompts`, :func:`raise_if_blocked` and
:func:`apply_suppression` on every call (a refused request is written to the audit log first), so no
caller can skip the policy by accident; hard blocks (sexual content involving minors, sexual or violent
depictions of listed real people) apply under every policy and cannot be overridden
(:meth:`~safelatent.safety.policy_file.Policy.with_overrides`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..errors import InvalidArgumentError
from ..sampling.sld_presets import SLDConfig
from .policy_file import ACTIONS, HARD_CATEGORIES, Policy, SafetyRelaxationError, load_policy
from .prompt_policy import PolicyDecision, TextEncoderSimilarity, check_prompt

__all__ = [
    "SLD_STRENGTH",
    "Policy",
    "apply_suppression",
    "raise_if_blocked",
    "refuse_relaxed_overrides",
    "refuse_weaker_sld",
    "resolve_policy",
    "screen_prompts",
    "strongest_preset",
]

#: SLD presets from weakest to strongest ("off" first; a suppressed category names one of the others)
SLD_STRENGTH = ("off", "weak-diffusers", "weak", "medium", "strong", "max")
_SLD_STRENGTH = SLD_STRENGTH[1:]


def resolve_policy(policy: Policy | str | os.PathLike | None) -> Policy:
    """A :class:`Policy` from a policy object, a TOML path, or a shipped name (``None`` = ``default``)."""
    if isinstance(policy, Policy):
        return policy
    return load_policy(policy)


def screen_prompts(
    prompts: Sequence[str],
    policy: Policy,
    overrides: dict[str, str] | None = None,
    similarity: TextEncoderSimilarity | None = None,
) -> list[PolicyDecision]:
    """The policy's decision for each prompt (blocked ones included: see :func:`raise_if_blocked`).

    Raises :class:`~safelatent.safety.policy_file.HardBlockRelaxationError` for an override of a hard
    category. ``similarity`` scores prompts in the model's text-encoder space when the policy enables it.
    """
    if overrides is not None and not isinstance(overrides, dict):
        raise InvalidArgumentError(
            "policy overrides must be a mapping of category to action", 'e.g. {"violence": "block"}'
        )
    return [check_prompt(prompt, policy, overrides=overrides, similarity=similarity) for prompt in prompts]


def refuse_relaxed_overrides(policy: Policy, overrides: dict[str, str] | None) -> None:
    """For requests that may only add safety: raise :class:`SafetyRelaxationError` for an override that
    sets a category below the policy's action (hard categories: anything but ``block``)."""
    for category, action in (overrides or {}).items():
        current = "block" if category in HARD_CATEGORIES else policy.categories.get(category)
        current = getattr(current, "action", current)
        if current is None or action not in ACTIONS:
            continue  # unknown names: Policy.with_overrides says what is wrong
        if ACTIONS.index(action) < ACTIONS.index(current):
            raise SafetyRelaxationError(
                f"request refused: it asks for {category!r} to be {action!r}, but policy {policy.name!r}"
                f" {'hard-blocks' if category in HARD_CATEGORIES else 'sets it to ' + repr(current)}; a"
                " request may ask for more safety, never less",
                f"remove the override, or ask for a stricter action than {current!r}",
            )


def strongest_preset(*names: str | None) -> str | None:
    """The strongest of some SLD preset names (``None``s ignored; ``"off"`` is the weakest)."""
    known = [name for name in names if name is not None]
    return max(known, key=SLD_STRENGTH.index) if known else None


def refuse_weaker_sld(decisions: Sequence[PolicyDecision], sld: str | SLDConfig | None) -> None:
    """For requests that may only add safety: raise :class:`SafetyRelaxationError` when a prompt hits a
    *suppress* category and the request names an SLD preset (``off`` included) weaker than the one
    that category asks for. (``None`` is fine: :func:`apply_suppression` then picks the preset.)"""
    if not isinstance(sld, str):
        return  # None, or an SLDConfig a library caller built (not a request's)
    asked = sld.strip().lower()
    for decision in decisions:
        if decision.action != "suppress":
            continue
        needed = decision.sld_preset or "medium"
        if asked in SLD_STRENGTH and SLD_STRENGTH.index(asked) < SLD_STRENGTH.index(needed):
            categories = ", ".join(c for c, a in decision.actions.items() if a == "suppress")
            raise SafetyRelaxationError(
                f"request refused: the prompt is suppressed by the policy ({categories}), which needs SLD"
                f" {needed!r} or stronger, but the request asks for SLD {asked!r}",
                f"ask for SLD {needed!r} or stronger, or leave SLD unset",
            )


def raise_if_blocked(decisions: Sequence[PolicyDecision]) -> None:
    """Raise :class:`~safelatent.safety.policy_file.PromptBlockedError` for the first blocked prompt (its
    message names the categories and matched words)."""
    for decision in decisions:
        decision.raise_if_blocked()


def apply_suppression(
    decisions: Sequence[PolicyDecision],
    sld: str | SLDConfig | None,
    safety_concept: str | None,
) -> tuple[str | SLDConfig | None, str | None]:
    """The SLD preset and concept a call runs with, given the policy's decisions.

    No prompt suppressed: ``(sld, safety_concept)`` unchanged. Otherwise SLD is on whatever the caller
    asked (``None``/``"off"`` become the strongest preset the suppressed categories name; a preset the
    caller chose is kept), and the concept is the caller's concept (if any) followed by the suppressed
    categories' concept texts, each phrase once (SLD has one concept per call; CLIP reads its first 77
    tokens).
    """
    suppressed = [d for d in decisions if d.action == "suppress"]
    if not suppressed:
        return sld, safety_concept
    if sld is None or (isinstance(sld, str) and sld.strip().lower() == "off"):
        presets = [d.sld_preset for d in suppressed if d.sld_preset]
        sld = max(presets, key=_SLD_STRENGTH.index) if presets else "medium"
    phrases: list[str] = []
    for text in [safety_concept, *(d.sld_concept for d in suppressed)]:
        for phrase in (text or "").split(","):
            phrase = phrase.strip()
            if phrase and phrase not in phrases:
                phrases.append(phrase)
    return sld, ", ".join(phrases)

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
from .policy_file import Policy, load_policy
from .prompt_policy import PolicyDecision, TextEncoderSimilarity, check_prompt

__all__ = ["Policy", "apply_suppression", "raise_if_blocked", "resolve_policy", "screen_prompts"]

#: SLD presets from weakest to strongest (a suppressed category names one)
_SLD_STRENGTH = ("weak-diffusers", "weak", "medium", "strong", "max")


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

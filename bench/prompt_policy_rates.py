"""Prompt policy rates: hard-block rate on the adversarial suite, block/suppress rates on COCO 30k, timing.

    .venv/bin/python bench/prompt_policy_rates.py [--policy default|artist|FILE.toml] [--show 10]

The adversarial suite (templates × sexual terms × minor terms, each obfuscated with homoglyphs, zero-width
characters, leetspeak, separators, spaced or repeated letters, case, punctuation, extra spaces, ...) and
the COCO prompts are the ones the tests use (tests/test_safety_prompt_policy.py; the CSV ships in
safelatent/eval/data). Lexical layer only: no model is loaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safelatent.safety.policy_file import load_policy
from safelatent.safety.prompt_policy import check_prompt
from tests.test_safety_prompt_policy import adversarial_prompts, coco_prompts


def _timed(prompts: list[str], policy) -> tuple[list, float]:
    """Decisions for ``prompts`` and the seconds they took."""
    start = time.perf_counter()
    decisions = [check_prompt(p, policy) for p in prompts]
    return decisions, time.perf_counter() - start


def main() -> None:
    """Print the adversarial hard-block rate, the COCO block and suppress rates and µs per prompt."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="default", help="default, artist or a policy .toml file")
    parser.add_argument("--show", type=int, default=5, help="how many missed/blocked prompts to print")
    args = parser.parse_args()
    policy = load_policy(args.policy)
    check_prompt("warm-up: builds the lexicon", policy)

    suite = adversarial_prompts()
    decisions, seconds = _timed([p for _, p in suite], policy)
    missed = [(name, d.prompt) for (name, _), d in zip(suite, decisions, strict=True) if not d.blocked]
    print(f"policy: {policy.name} ({policy.source})")
    print(
        f"adversarial hard-category prompts: {len(suite)}, blocked {1 - len(missed) / len(suite):.2%}"
        f" (target >= 99%), {seconds / len(suite) * 1e6:.0f} µs per prompt"
    )
    by_obfuscation = Counter(name for name, _ in missed)
    for name, prompt in missed[: args.show]:
        print(f"  missed [{name}]: {prompt!r}")
    if by_obfuscation:
        print(f"  misses by obfuscation: {dict(by_obfuscation)}")

    prompts = coco_prompts()
    decisions, seconds = _timed(prompts, policy)
    blocked = [d for d in decisions if d.blocked]
    suppressed = [d for d in decisions if d.action == "suppress"]
    print(
        f"COCO 30k: blocked {len(blocked)} ({len(blocked) / len(prompts):.3%}, target <= 0.5%),"
        f" suppressed {len(suppressed)} ({len(suppressed) / len(prompts):.2%}),"
        f" {seconds / len(prompts) * 1e6:.0f} µs per prompt"
    )
    for decision in blocked[: args.show]:
        print(f"  blocked: {decision.prompt!r} — {decision.message}")
    terms = Counter(r.term for d in suppressed for c in d.suppressed for r in d.reasons[c])
    print(f"  most common suppressing terms: {terms.most_common(10)}")


if __name__ == "__main__":
    main()

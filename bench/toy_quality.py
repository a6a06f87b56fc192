"""Toy-model quality figures (issue 3): fidelity, marker and theme rates, SLD ordering.

    python bench/toy_quality.py [--samples 200] [--model DIR] [--out bench/results]

Same as ``safelatent toy eval``; the table it prints is the one pasted in the README.
"""

from __future__ import annotations

import argparse
import time

from safelatent import api
from safelatent.toy.evaluate import ToyQualityConfig, evaluate_toy_quality, write_report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    pipe = api.load(args.model, device="cpu")
    config = ToyQualityConfig(samples=args.samples, steps=args.steps, seed=args.seed)
    started = time.perf_counter()
    report = evaluate_toy_quality(pipe, config, on_condition=lambda r: print(r, flush=True))
    write_report(report, args.out)
    print(report.markdown())
    print(f"\n{time.perf_counter() - started:.0f} s on {pipe.components.device}")


if __name__ == "__main__":
    main()

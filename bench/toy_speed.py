"""Toy-model generation speed on the CPU (issue 3 target: 4 images × 30 steps ≤ 3 s after load).

    python bench/toy_speed.py [--repeats 5] [--threads 2]

Prints min / median / max seconds for CFG alone and with SLD (three branches), model already loaded.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from safelatent import api
from safelatent.toy import world


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pipe = api.load(None, device="cpu")
    print(f"load: {time.perf_counter() - started:.2f} s")
    for sld in ("off", "medium"):
        concept = world.MARKER_PHRASE if sld != "off" else None  # the toy's SLD concept
        pipe.generate(
            "a red circle",
            num_images_per_prompt=4,
            num_inference_steps=30,
            seed=0,
            sld=sld,
            safety_concept=concept,
        )  # warm
        times = []
        for repeat in range(args.repeats):
            t0 = time.perf_counter()
            pipe.generate(
                "a red circle on a white background",
                num_images_per_prompt=4,
                num_inference_steps=30,
                scheduler="ddim",
                seed=repeat,
                sld=sld,
                safety_concept=concept,
            )
            times.append(time.perf_counter() - t0)
        print(
            f"4 images x 30 steps, SLD {sld}: min {min(times):.2f} s,"
            f" median {statistics.median(times):.2f} s, max {max(times):.2f} s ({args.threads} threads)"
        )


if __name__ == "__main__":
    main()

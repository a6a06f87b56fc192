#!/usr/bin/env python
"""Build the shipped Q16 prompt embeddings (``safety/data/q16_prompts.safetensors``) from ``.npy`` files.

Q16 (Schramowski et al., "Can Machines Help Us Answering Question 16 in Datasheets, and In Turn
Reflecting on Inappropriate Content?", FAccT 2022, https://github.com/ml-research/Q16, MIT license) is a
CLIP zero-shot classifier with two *learned* prompt embeddings per CLIP model: row 0 = "non
inappropriate", row 1 = "inappropriate". The authors publish them as pickles (``data/<model>/prompts.p``);
this script reads a pickle-free ``.npy`` conversion of them (``np.load(allow_pickle=False)``: nothing is
unpickled) and writes one safetensors file with the tensors ``ViT-L-14`` (2, 768), ``ViT-B-16`` (2, 512)
and ``ViT-B-32`` (2, 512), float16, values bit-identical, plus a metadata header naming the source and
license. It prints the SHA-256 of each tensor's bytes (``tests/test_safety_q16.py`` pins them).

Usage::

    python scripts/build_q16_prompts.py [--src /work/shared/data] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

VARIANTS = {"ViT-L-14": 768, "ViT-B-16": 512, "ViT-B-32": 512}
"""Tensor name (the CLIP model, as in Q16's ``data/`` folder names) → embedding width."""
DEFAULT_SRC = Path("/work/shared/data")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/safelatent/safety/data/q16_prompts.safetensors"
METADATA = {
    "format": "pt",
    "name": "Q16 learned prompt embeddings",
    "source": "https://github.com/ml-research/Q16 data/<model>/prompts.p (pickle converted to .npy, "
    "values unchanged)",
    "paper": "Schramowski et al., Can Machines Help Us Answering Question 16 in Datasheets, and In Turn "
    "Reflecting on Inappropriate Content?, FAccT 2022",
    "license": "MIT (ml-research/Q16)",
    "rows": "0 = non inappropriate, 1 = inappropriate",
    "usage": "softmax(100 * normalize(clip_image_embedding) @ normalize(prompts).T)[:, 1] = P(inappropriate)",
}


def read_prompts(src: Path) -> dict[str, np.ndarray]:
    """The three (2, width) float16 arrays, checked for shape, dtype and finiteness."""
    out = {}
    for name, width in VARIANTS.items():
        path = src / f"q16_prompts_{name}.npy"
        array = np.load(path, allow_pickle=False)
        if array.shape != (2, width) or array.dtype != np.float16 or not np.isfinite(array).all():
            sys.exit(
                f"{path}: expected finite float16 of shape (2, {width}), got {array.dtype} {array.shape}"
            )
        out[name] = np.ascontiguousarray(array)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--src", type=Path, default=DEFAULT_SRC, help=f"folder of the .npy files ({DEFAULT_SRC})"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output file (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    arrays = read_prompts(args.src)
    tensors = {name: torch.from_numpy(a.copy()) for name, a in arrays.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=METADATA)

    back = load_file(str(args.out))
    for name, array in arrays.items():
        if back[name].dtype != torch.float16 or back[name].numpy().tobytes() != array.tobytes():
            sys.exit(f"{args.out}: tensor {name} does not round-trip bit for bit")
        print(f"{name}: {array.shape} float16, sha256 {hashlib.sha256(array.tobytes()).hexdigest()}")
    data = args.out.read_bytes()
    print(f"wrote {args.out}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

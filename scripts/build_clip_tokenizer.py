#!/usr/bin/env python
"""Build the shipped CLIP BPE tokenizer files from open_clip's ``bpe_simple_vocab_16e6.txt.gz``.

The CLIP tokenizer (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", https://github.com/openai/CLIP) is a byte-level BPE with 49152 - 256 - 2 = 48894 merges.
Stable Diffusion 1.x uses it through Hugging Face's ``openai/clip-vit-large-patch14`` tokenizer folder,
whose ``vocab.json`` / ``merges.txt`` are a mechanical conversion of the same BPE file that OpenAI's
``clip/simple_tokenizer.py`` (and open_clip's copy of it) reads. This script redoes that conversion
offline so the package never needs a model hub:

* ``vocab.json``: the 256 byte-level unicode symbols, the same 256 with ``</w>``, one entry per merge
  (the merged pair joined), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49408 ids;
* ``merges.txt``: ``#version: 0.2`` followed by the 48894 merges, i.e. ``lines[1:49152-256-2+1]``;
* ``tokenizer_config.json`` / ``special_tokens_map.json`` as in Stable Diffusion 1.5's ``tokenizer/``.

open_clip is NOT imported (``import open_clip`` pulls in torchvision); the BPE file is found through
``importlib.util.find_spec`` or read from an open-clip-torch wheel given with ``--wheel``.

Usage::

    python scripts/build_clip_tokenizer.py [--wheel open_clip_torch-*.whl] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_MEMBER = f"open_clip/{BPE_NAME}"
NUM_MERGES = 49152 - 256 - 2  # as in CLIP's simple_tokenizer.py: merges = lines[1 : 49152 - 256 - 2 + 1]
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/safelatent/models/configs/clip_tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible map from the 256 byte values to printable unicode characters.

    Printable latin-1 bytes map to themselves; the remaining 68 (control characters, space, soft hyphen,
    ...) map to ``chr(256 + n)`` in byte order. Reproduces ``bytes_to_unicode`` of OpenAI CLIP's
    ``simple_tokenizer.py`` (itself taken from GPT-2's ``encoder.py``).
    """
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def read_bpe_bytes(wheel: Path | None) -> tuple[bytes, str]:
    """The gzipped BPE file's bytes and a description of where they came from."""
    if wheel is not None:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(BPE_MEMBER), f"{wheel}!{BPE_MEMBER}"
    spec = importlib.util.find_spec("open_clip")  # locates the package without executing __init__.py
    if spec is None or not spec.submodule_search_locations:
        sys.exit("open_clip is not installed: `pip install --no-deps open-clip-torch`, or pass --wheel PATH")
    for location in spec.submodule_search_locations:
        path = Path(location) / BPE_NAME
        if path.is_file():
            return path.read_bytes(), str(path)
    sys.exit(f"{BPE_NAME} not found in {list(spec.submodule_search_locations)}")


def convert(bpe_text: str) -> tuple[dict[str, int], list[str]]:
    """Vocabulary (token -> id, in id order) and merge lines, exactly as CLIP builds them."""
    lines = bpe_text.split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    pairs = [tuple(m.split()) for m in merges]
    if len(pairs) != NUM_MERGES or any(len(p) != 2 for p in pairs):
        raise ValueError(f"unexpected BPE file: {len(pairs)} merges, expected {NUM_MERGES} pairs")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(p) for p in pairs] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(vocab) != 49408:
        raise ValueError(
            f"vocabulary has {len(vocab)} unique entries for {len(tokens)} tokens, expected 49408"
        )
    return vocab, [" ".join(p) for p in pairs]


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def tokenizer_config() -> dict:
    """``tokenizer_config.json`` of Stable Diffusion 1.5's ``tokenizer/`` folder (hub/path fields dropped)."""
    return {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **_special(BOS)},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **_special(EOS)},
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **_special(EOS)},
    }


def special_tokens_map() -> dict:
    """``special_tokens_map.json`` of Stable Diffusion 1.5's ``tokenizer/`` folder."""
    return {
        "bos_token": _special(BOS),
        "eos_token": _special(EOS),
        "pad_token": EOS,
        "unk_token": _special(EOS),
    }


def _dump(obj: dict) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help="read the BPE file from this open-clip-torch wheel")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)

    raw, source = read_bpe_bytes(args.wheel)
    vocab, merges = convert(gzip.decompress(raw).decode("utf-8"))

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    files = {
        # id order, one line, non-ASCII kept literally: the layout of openai/clip-vit-large-patch14's file.
        "vocab.json": json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(m + "\n" for m in merges),
        "tokenizer_config.json": _dump(tokenizer_config()),
        "special_tokens_map.json": _dump(special_tokens_map()),
    }
    print(f"source: {source} (sha256 {hashlib.sha256(raw).hexdigest()})")
    for name, text in files.items():
        data = text.encode("utf-8")
        (out / name).write_bytes(data)
        print(f"wrote {out / name}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

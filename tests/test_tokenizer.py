"""The shipped CLIP tokenizer against open_clip's copy of OpenAI CLIP's ``simple_tokenizer.py``.

open_clip is the oracle: CI installs it with ``pip install --no-deps open-clip-torch``. Its package
``__init__`` imports torchvision, so only ``open_clip/tokenizer.py`` is loaded, under a stand-in package
module that is removed from ``sys.modules`` again afterwards.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import sys
import types

import pytest
import torch

from safelatent.eval import shipped_data
from safelatent.models.tokenizer import (
    CLIP_EOS_TOKEN,
    clip_tokenizer_dir,
    load_clip_tokenizer,
    tokenize_prompts,
)

I2P_CSV = shipped_data("i2p_benchmark.csv")
EOT = 49407
SOT = 49406


def _load_open_clip_tokenizer_module() -> types.ModuleType:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            "open_clip is the reference for the CLIP tokenizer tests but is not installed: "
            "run `pip install --no-deps open-clip-torch`"
        )
    saved = {name: mod for name, mod in sys.modules.items() if name.split(".")[0] == "open_clip"}
    for name in saved:
        del sys.modules[name]
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["open_clip"] = package
    try:
        return importlib.import_module("open_clip.tokenizer")
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "open_clip"]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def oracle() -> types.ModuleType:
    return _load_open_clip_tokenizer_module()


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def i2p_prompts() -> list[str]:
    with I2P_CSV.open(newline="", encoding="utf-8") as f:
        return [row["prompt"] for row in csv.DictReader(f)]


def test_shipped_folder_layout():
    names = {p.name for p in clip_tokenizer_dir().iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"} <= names
    assert (clip_tokenizer_dir() / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")


def test_vocab_and_merges_equal_open_clip(tokenizer, oracle):
    ref = oracle._tokenizer  # the instance open_clip's tokenize() uses
    # open_clip names the special tokens <start_of_text>/<end_of_text>; HF (and SD) use <|...|>
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    expected = {renamed.get(tok, tok): i for tok, i in ref.encoder.items()}
    assert tokenizer.get_vocab() == expected
    merges = (clip_tokenizer_dir() / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert [tuple(m.split()) for m in merges] == sorted(ref.bpe_ranks, key=ref.bpe_ranks.get)


def test_vocab_size_and_special_ids(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer.vocab_size == 49408
    assert tokenizer.convert_tokens_to_ids(CLIP_EOS_TOKEN) == EOT
    assert tokenizer.eos_token_id == EOT
    assert tokenizer.bos_token_id == SOT
    assert tokenizer.pad_token_id == EOT
    assert tokenizer.model_max_length == 77
    assert load_clip_tokenizer(pad_token="!").pad_token_id == 0


def test_loader_returns_independent_instances():
    a, b = load_clip_tokenizer(), load_clip_tokenizer()
    assert a is not b
    a.padding_side = "left"
    assert b.padding_side == "right"


def test_i2p_parity_with_open_clip(tokenizer, oracle, i2p_prompts):
    """Every I2P prompt: same ids as open_clip ``tokenize()`` (context 77, last id forced to eot)."""
    assert len(i2p_prompts) == 4703
    ref = oracle.tokenize(i2p_prompts, context_length=77).tolist()
    ours = tokenizer(i2p_prompts, truncation=True, max_length=77).input_ids
    mismatches = []
    for prompt, ref_row, ids in zip(i2p_prompts, ref, ours, strict=True):
        ref_ids = ref_row[: ref_row.index(EOT) + 1]  # open_clip pads with 0 after <eot>
        if ids != ref_ids:
            mismatches.append((prompt, ref_ids, ids))
    assert not mismatches, (
        f"{len(mismatches)} of {len(i2p_prompts)} I2P prompts tokenize differently from open_clip; "
        f"first: {mismatches[0]!r}"
    )
    n_truncated = sum(len(ids) == 77 for ids in ours)
    assert n_truncated > 0, f"compared {len(i2p_prompts)} prompts, none reaches 77 tokens"


def test_cleaning_matches_clip(tokenizer, oracle):
    # curly quotes/apostrophes (ftfy), html entities, whitespace runs, upper case
    text = "  “A Cat’s  &amp;amp; DOG”\t\n portrait &lt;3 café "
    assert tokenizer(text).input_ids == [SOT, *oracle._tokenizer.encode(text), EOT]


def test_tokenize_prompts_truncates_and_reports_cut(tokenizer):
    head = "a photo of a cat sitting on a red sofa, " * 9  # well over 75 tokens
    tail = "and a zebra riding a bicycle"
    out = tokenize_prompts(tokenizer, [head + tail, "a short prompt"])
    assert out.input_ids.dtype == torch.long
    assert out.input_ids.shape == (2, 77)
    assert out.input_ids[0, 0] == SOT
    assert out.input_ids[0, -1] == EOT
    assert EOT not in out.input_ids[0, :-1].tolist()
    cut = out.cut[0]
    assert cut, "a prompt longer than 77 tokens must report what was cut"
    # CLIP's BPE keeps no spacing information: decoding writes "sofa ," for "sofa,"
    assert cut.endswith(tail)
    assert (head + tail).replace(" ", "").endswith(cut.replace(" ", ""))
    assert len(cut.split()) < len((head + tail).split())
    assert out.cut[1] is None
    short = out.input_ids[1].tolist()
    assert short[:5] == [SOT, 320, 3005, 20198, EOT]
    assert short[5:] == [EOT] * 72


def test_tokenize_prompts_pad_and_max_length():
    tok = load_clip_tokenizer(pad_token="!")
    out = tokenize_prompts(tok, ["a short prompt", "one two three four five six"], max_length=6)
    assert out.input_ids.tolist() == [[SOT, 320, 3005, 20198, EOT, 0], [SOT, 637, 1237, 2097, 2721, EOT]]
    assert out.cut == [None, "five six"]
    empty = tokenize_prompts(tok, [])
    assert empty.input_ids.shape == (0, 77) and empty.cut == []

"""The CLIP BPE tokenizer that Stable Diffusion uses, shipped inside the package (no hub, no network).

The files in ``models/configs/clip_tokenizer/`` are the byte-level BPE of OpenAI CLIP (Radford et al.
2021, "Learning Transferable Visual Models From Natural Language Supervision",
https://github.com/openai/CLIP): 48894 merges, 49408 ids, ``<|startoftext|>`` = 49406 and
``<|endoftext|>`` = 49407 — the same vocabulary as Hugging Face's ``openai/clip-vit-large-patch14``
tokenizer used by Stable Diffusion 1.x (and, with ``!`` as pad, 2.x). ``scripts/build_clip_tokenizer.py``
regenerates them from open_clip's ``bpe_simple_vocab_16e6.txt.gz``.

Text cleaning follows CLIP's ``simple_tokenizer.py`` rather than the Rust backend of transformers 5's
``CLIPTokenizer`` (which only applies NFC + whitespace collapsing + lower-casing): ``ftfy.fix_text``, a
double ``html.unescape``, whitespace collapsing and lower-casing. Without it, e.g. curly quotes and
apostrophes (“ ” ’), frequent in real prompts, become multi-token byte sequences instead of ``"``/``'``,
and the ids differ from what CLIP was trained on.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import ftfy
import torch
from transformers import CLIPTokenizer

__all__ = [
    "CLIP_BOS_TOKEN",
    "CLIP_EOS_TOKEN",
    "CLIP_MAX_LENGTH",
    "CleanCLIPTokenizer",
    "TokenizedPrompts",
    "clip_clean_text",
    "clip_tokenizer_dir",
    "load_clip_tokenizer",
    "tokenize_prompts",
]

CLIP_BOS_TOKEN = "<|startoftext|>"
CLIP_EOS_TOKEN = "<|endoftext|>"
#: CLIP's text context length (positional embeddings of the text encoder).
CLIP_MAX_LENGTH = 77


def clip_tokenizer_dir() -> Path:
    """The shipped tokenizer folder (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
    ``special_tokens_map.json``), laid out like a diffusers ``tokenizer/`` folder so it can be copied as one.
    """
    return Path(str(resources.files("safelatent.models") / "configs" / "clip_tokenizer"))


def clip_clean_text(text: str) -> str:
    """Normalize a prompt exactly as OpenAI CLIP's ``simple_tokenizer.py`` does before BPE.

    ``basic_clean`` (``ftfy.fix_text``, ``html.unescape`` twice, strip), then ``whitespace_clean``
    (collapse runs of whitespace) and ``lower()`` — open_clip's default ``clean="lower"``.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def _clean_input(text):
    if isinstance(text, str):
        return clip_clean_text(text)
    if isinstance(text, (list, tuple)):
        return type(text)(_clean_input(t) for t in text)
    return text


class CleanCLIPTokenizer(CLIPTokenizer):
    """transformers' ``CLIPTokenizer`` whose text inputs first go through :func:`clip_clean_text`.

    The Rust backend cannot run ftfy, so the cleaning happens in Python on every ``str`` input (and
    pair) before encoding; pre-split word lists (``is_split_into_words=True``) are passed through
    unchanged. Offsets (``return_offsets_mapping``) refer to the cleaned text. Everything else — vocab,
    merges, special tokens, truncation, padding, decoding — is the parent class's.
    """

    def _encode_plus(self, text, text_pair=None, *args, is_split_into_words: bool = False, **kwargs):
        if not is_split_into_words:
            text = _clean_input(text)
            text_pair = _clean_input(text_pair)
        return super()._encode_plus(text, text_pair, *args, is_split_into_words=is_split_into_words, **kwargs)


def load_clip_tokenizer(
    pad_token: str = CLIP_EOS_TOKEN, model_max_length: int = CLIP_MAX_LENGTH
) -> CleanCLIPTokenizer:
    """A fresh tokenizer reproducing the OpenAI CLIP BPE tokenizer (Radford et al. 2021).

    Built from :func:`clip_tokenizer_dir` only (never a hub). ``pad_token`` is ``<|endoftext|>`` (49407)
    for Stable Diffusion 1.x and ``"!"`` (id 0) for 2.x. ``model_max_length`` is set explicitly (77 =
    CLIP's context length): ``truncation=True`` without it would not cut at the text encoder's limit.

    The returned object is a subclass of ``transformers.CLIPTokenizer`` (see :class:`CleanCLIPTokenizer`)
    and a new instance on every call (~0.1 s), so mutating it affects no other caller. It is not cached
    and copied instead: ``copy.deepcopy`` of a transformers 5 ``CLIPTokenizer`` loses the patch that makes
    ``decode`` turn ``</w>`` into spaces.
    """
    return CleanCLIPTokenizer.from_pretrained(
        str(clip_tokenizer_dir()),
        pad_token=pad_token,
        model_max_length=model_max_length,
        local_files_only=True,
    )


@dataclass(frozen=True)
class TokenizedPrompts:
    """Token ids for a batch of prompts and, per prompt, the text truncation removed."""

    #: ``(len(prompts), max_length)`` ids: ``<|startoftext|> ... <|endoftext|>`` then padding.
    input_ids: torch.LongTensor
    #: For each prompt the decoded text that did not fit (``None`` when nothing was cut).
    cut: list[str | None]


def tokenize_prompts(
    tokenizer: CLIPTokenizer, prompts: list[str], max_length: int | None = None
) -> TokenizedPrompts:
    """Tokenize prompts like diffusers' Stable Diffusion pipelines (``encode_prompt``) do.

    Ids are padded and truncated to ``max_length`` (default ``tokenizer.model_max_length``) with
    ``padding="max_length", truncation=True``, so a long prompt keeps ``<|startoftext|>``, its first
    ``max_length - 2`` tokens and ``<|endoftext|>`` — the same ids as OpenAI CLIP's ``tokenize()``
    (Radford et al. 2021), which truncates to the context length and forces the last id to end-of-text.
    ``cut[i]`` is computed as diffusers does for its "the following part of your input was truncated"
    warning: tokenize untruncated and decode the ids from ``max_length - 1`` up to the final end-of-text.
    """
    prompts = list(prompts)
    max_length = tokenizer.model_max_length if max_length is None else max_length
    if not prompts:
        return TokenizedPrompts(input_ids=torch.empty((0, max_length), dtype=torch.long), cut=[])
    input_ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    cut: list[str | None] = []
    for ids in tokenizer(prompts, padding=False, truncation=False).input_ids:
        cut.append(tokenizer.decode(ids[max_length - 1 : -1]) if len(ids) > max_length else None)
    return TokenizedPrompts(input_ids=input_ids, cut=cut)

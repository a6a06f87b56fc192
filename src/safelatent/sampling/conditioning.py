"""Text conditionings for every branch of the loop: unconditional/negative, prompt, concepts.

Encoding follows diffusers' pipelines, so the same weights and seed give the same images:

* SD 1.x / 2.x (``StableDiffusionPipeline.encode_prompt``): pad to the text encoder's context (77 tokens
  for every SD model, 32 for the toy), truncate, the last hidden state of the CLIP text encoder.
* SDXL (``StableDiffusionXLPipeline.encode_prompt``; Podell et al. 2023, *SDXL*, arXiv 2307.01952, §2.1):
  the penultimate hidden states of both text encoders concatenated along the width, plus the pooled,
  projected embedding of the second encoder; and the size/crop micro-conditioning of §2.2
  (:func:`sdxl_time_ids`). Without a negative prompt, a model whose ``force_zeros_for_empty_prompt`` is set
  (SDXL base) gets an all-zero unconditional branch, as diffusers does.

Every branch — unconditional, prompt and each SLD concept — is encoded the same way, so SLD's concept
branch on SDXL carries both encoders' states and its own pooled embedding.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..models.tokenizer import tokenize_prompts


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's context (77 tokens for SD); the tail was cut."""


@dataclass
class Conditioning:
    """Per-branch text embeddings, each ``[N, context, d]`` with ``N = prompts × images per prompt``.

    SDXL adds a pooled embedding per branch (``[N, d_pool]``) and the micro-conditioning ``time_ids``
    (``[N, 6]``, the same for every branch).
    """

    uncond: torch.Tensor | None
    text: torch.Tensor
    concepts: tuple[torch.Tensor, ...] = ()
    truncated: list[str] = field(default_factory=list)
    uncond_pooled: torch.Tensor | None = None
    text_pooled: torch.Tensor | None = None
    concepts_pooled: tuple[torch.Tensor, ...] = ()
    time_ids: torch.Tensor | None = None

    def branches(self) -> list[torch.Tensor]:
        """The branch embeddings in loop order: [uncond], prompt, concept_1..k."""
        head = [self.uncond] if self.uncond is not None else []
        return [*head, self.text, *self.concepts]

    def added_conditions(self, device, dtype) -> dict[str, torch.Tensor] | None:
        """The UNet's ``added_cond_kwargs`` for all branches in loop order (SDXL), else ``None``."""
        if self.text_pooled is None:
            return None
        if self.time_ids is None:
            raise ValueError("an SDXL conditioning needs time_ids: call with_time_ids(...) first")
        head = [self.uncond_pooled] if self.uncond is not None else []
        pooled = torch.cat([*head, self.text_pooled, *self.concepts_pooled])
        n_branches = len(self.branches())
        return {
            "text_embeds": pooled.to(device=device, dtype=dtype),
            "time_ids": self.time_ids.repeat(n_branches, 1).to(device=device, dtype=dtype),
        }

    def with_time_ids(self, time_ids: Sequence[float]) -> Conditioning:
        """This conditioning with one micro-conditioning row (:func:`sdxl_time_ids`) for every image."""
        row = torch.tensor([list(time_ids)], dtype=self.text.dtype)
        return replace(self, time_ids=row.repeat(self.text.shape[0], 1))


def sdxl_time_ids(
    original_size: tuple[int, int],
    crop_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
) -> list[int]:
    """SDXL's size and crop micro-conditioning (Podell et al. 2023, arXiv 2307.01952, §2.2):
    ``(h_orig, w_orig, c_top, c_left, h_target, w_target)``, each Fourier-embedded by the UNet.

    At generation, diffusers' default is ``original = target = (height, width)`` and no crop; in training
    the values describe the real image before resizing and cropping (:mod:`safelatent.train.data`).
    """
    target = original_size if target_size is None else target_size
    return [*map(int, original_size), *map(int, crop_top_left), *map(int, target)]


@torch.inference_mode()
def encode_texts(tokenizer, text_encoder, texts: list[str], *, what: str = "prompt", hidden_layer=None):
    """Encode ``texts`` with one CLIP text encoder (inference mode); warn for each truncated text.

    Returns ``(hidden, pooled, messages)``: ``hidden`` ``[len(texts), context, d]`` is the last hidden
    state (``hidden_layer=None``) or ``hidden_states[hidden_layer]`` (SDXL: ``-2``); ``pooled`` is the
    encoder's 2-D first output (``CLIPTextModelWithProjection``'s projected ``text_embeds``) or ``None``;
    ``messages`` describe what was cut.
    """
    return run_text_encoder(tokenizer, text_encoder, texts, what=what, hidden_layer=hidden_layer)


def run_text_encoder(tokenizer, text_encoder, texts: list[str], *, what: str = "prompt", hidden_layer=None):
    """:func:`encode_texts` in the caller's autograd mode (training a text encoder needs gradients)."""
    tokens = tokenize_prompts(tokenizer, texts)
    messages = []
    for text, cut in zip(texts, tokens.cut, strict=True):
        if cut:
            message = (
                f"{what} longer than {tokenizer.model_max_length} CLIP tokens; this part was cut: {cut!r}"
                f" (prompt starts {text[:40]!r})"
            )
            warnings.warn(message, PromptTruncatedWarning, stacklevel=3)
            messages.append(message)
    inner = getattr(text_encoder, "module", text_encoder)  # a DDP-wrapped encoder (training) is called
    device = inner.device  # as the wrapper, so gradients synchronise, but has no config of its own
    attention_mask = None
    if getattr(inner.config, "use_attention_mask", False):
        attention_mask = (tokens.input_ids != tokenizer.pad_token_id).long().to(device)
    output = text_encoder(
        tokens.input_ids.to(device),
        attention_mask=attention_mask,
        output_hidden_states=hidden_layer is not None,
    )
    hidden = output[0] if hidden_layer is None else output.hidden_states[hidden_layer]
    pooled = output[0] if output[0].ndim == 2 else None
    return hidden, pooled, messages


@dataclass(frozen=True)
class PromptEncoder:
    """How a model turns texts into branch conditionings: one CLIP encoder (SD 1.x/2.x) or two (SDXL)."""

    tokenizers: tuple[Any, ...]
    text_encoders: tuple[Any, ...]
    #: SDXL's ``force_zeros_for_empty_prompt``: no negative prompt ⇒ an all-zero unconditional branch
    zero_unconditional: bool = False

    @classmethod
    def of(cls, components) -> PromptEncoder:
        """The encoder of loaded :class:`~safelatent.models.components.StableDiffusionComponents`."""
        if components.text_encoder_2 is None:
            return cls((components.tokenizer,), (components.text_encoder,))
        return cls(
            (components.tokenizer, components.tokenizer_2),
            (components.text_encoder, components.text_encoder_2),
            zero_unconditional=bool(components.force_zeros_for_empty_prompt),
        )

    @property
    def pooled(self) -> bool:
        return len(self.text_encoders) > 1

    def encode(self, texts: list[str], *, what: str = "prompt", grad: bool = False):
        """``(hidden, pooled, messages)`` for ``texts`` (``pooled`` is ``None`` for SD 1.x/2.x); in
        inference mode unless ``grad``."""
        with contextlib.nullcontext() if grad else torch.inference_mode():
            return self._encode(texts, what)

    def _encode(self, texts: list[str], what: str):
        if not self.pooled:
            return run_text_encoder(self.tokenizers[0], self.text_encoders[0], texts, what=what)
        hiddens, pooled, messages = [], None, []
        for index, (tokenizer, text_encoder) in enumerate(
            zip(self.tokenizers, self.text_encoders, strict=True)
        ):
            with warnings.catch_warnings():
                if index:  # both tokenizers cut at the same token: warn once
                    warnings.simplefilter("ignore", PromptTruncatedWarning)
                hidden, pooled_here, cut = run_text_encoder(
                    tokenizer, text_encoder, texts, what=what, hidden_layer=-2
                )
            hiddens.append(hidden)
            pooled = pooled_here if pooled_here is not None else pooled
            messages = messages or cut
        if pooled is None:
            raise ValueError(
                "SDXL's second text encoder must return a pooled projection (CLIPTextModelWithProjection)"
            )
        return torch.cat(hiddens, dim=-1), pooled, messages


def build_conditioning(
    encoder: PromptEncoder,
    prompts: list[str],
    *,
    negative_prompts: list[str] | None,
    concepts: tuple[str, ...],
    needs_uncond: bool,
    num_images_per_prompt: int,
) -> Conditioning:
    """Encode the prompt branch, the unconditional branch (the negative prompts, or ``""`` — all zeros for
    SDXL base) if the guidance needs it, and each concept once; repeat each row ``num_images_per_prompt``
    times in prompt-major order (image ``i`` of prompt ``p`` is row ``p * n + i``), as diffusers does."""
    n = num_images_per_prompt

    def repeat(tensor):
        return None if tensor is None else tensor.repeat_interleave(n, dim=0)

    text, text_pooled, truncated = encoder.encode(prompts)
    uncond = uncond_pooled = None
    if needs_uncond:
        if negative_prompts is None and encoder.zero_unconditional:
            uncond = torch.zeros_like(text)
            uncond_pooled = None if text_pooled is None else torch.zeros_like(text_pooled)
        else:
            negatives = negative_prompts if negative_prompts is not None else [""] * len(prompts)
            uncond, uncond_pooled, cut = encoder.encode(negatives, what="negative prompt")
            truncated += cut
    concept_embeddings, concept_pooled = [], []
    rows = text.shape[0] * n
    for concept in concepts:
        embedding, pooled, cut = encoder.encode([concept], what="safety concept")
        concept_embeddings.append(embedding.expand(rows, -1, -1).contiguous())
        if pooled is not None:
            concept_pooled.append(pooled.expand(rows, -1).contiguous())
        truncated += cut
    return Conditioning(
        uncond=repeat(uncond),
        text=repeat(text),
        concepts=tuple(concept_embeddings),
        truncated=truncated,
        uncond_pooled=repeat(uncond_pooled),
        text_pooled=repeat(text_pooled),
        concepts_pooled=tuple(concept_pooled),
    )

"""Text conditionings for every branch of the loop: unconditional/negative, prompt, concepts.

Encoding follows diffusers' Stable Diffusion pipelines (pad to the text encoder's context — 77 tokens for
every SD model, 32 for the toy — truncate, last hidden state of the CLIP text encoder, one row per image),
so the same weights and seed give the same images.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from ..models.tokenizer import tokenize_prompts


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's context (77 tokens for SD); the tail was cut."""


@dataclass
class Conditioning:
    """Per-branch text embeddings, each ``[N, context, d]`` with ``N = prompts × images per prompt``."""

    uncond: torch.Tensor | None
    text: torch.Tensor
    concepts: tuple[torch.Tensor, ...] = ()
    truncated: list[str] = field(default_factory=list)

    def branches(self) -> list[torch.Tensor]:
        """The branch embeddings in loop order: [uncond], prompt, concept_1..k."""
        head = [self.uncond] if self.uncond is not None else []
        return [*head, self.text, *self.concepts]


@torch.inference_mode()
def encode_texts(tokenizer, text_encoder, texts: list[str], *, what: str = "prompt"):
    """Encode ``texts`` to ``[len(texts), context, d]`` hidden states; warn for each truncated text.

    Returns ``(embeddings, messages)`` where ``messages`` describe what was cut.
    """
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
    device = text_encoder.device
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = (tokens.input_ids != tokenizer.pad_token_id).long().to(device)
    hidden = text_encoder(tokens.input_ids.to(device), attention_mask=attention_mask)[0]
    return hidden, messages


def build_conditioning(
    tokenizer,
    text_encoder,
    prompts: list[str],
    *,
    negative_prompts: list[str] | None,
    concepts: tuple[str, ...],
    needs_uncond: bool,
    num_images_per_prompt: int,
) -> Conditioning:
    """Encode the prompt branch, the unconditional branch (the negative prompts, or ``""``) if the
    guidance needs it, and each concept once; repeat each row ``num_images_per_prompt`` times in
    prompt-major order (image ``i`` of prompt ``p`` is row ``p * n + i``), as diffusers does."""
    n = num_images_per_prompt
    text, truncated = encode_texts(tokenizer, text_encoder, prompts)
    text = text.repeat_interleave(n, dim=0)
    uncond = None
    if needs_uncond:
        negatives = negative_prompts if negative_prompts is not None else [""] * len(prompts)
        uncond, cut = encode_texts(tokenizer, text_encoder, negatives, what="negative prompt")
        uncond = uncond.repeat_interleave(n, dim=0)
        truncated += cut
    concept_embeddings = []
    for concept in concepts:
        embedding, cut = encode_texts(tokenizer, text_encoder, [concept], what="safety concept")
        concept_embeddings.append(embedding.expand(text.shape[0], -1, -1).contiguous())
        truncated += cut
    return Conditioning(uncond=uncond, text=text, concepts=tuple(concept_embeddings), truncated=truncated)

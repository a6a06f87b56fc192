"""Captions → the UNet's text conditioning during training, for every model family.

SD 1.x/2.x: the text encoder's last hidden state. SDXL (Podell et al. 2023, arXiv 2307.01952): both
encoders' penultimate states concatenated plus the second encoder's pooled projection — the same
:class:`~safelatent.sampling.conditioning.PromptEncoder` that generation uses, with gradients when a
text encoder is trained — and the size/crop micro-conditioning of §2.2 per example
(:func:`~safelatent.sampling.conditioning.sdxl_time_ids`, built by the data pipeline from each image's
original size, crop offset and bucket).
"""

from __future__ import annotations

import torch

from ..sampling.conditioning import PromptEncoder


class TrainingText:
    """Encodes captions (optionally from a cache) and builds the UNet's keyword arguments."""

    def __init__(self, components, device, trained: bool) -> None:
        self.components, self.device, self.trained = components, device, trained
        #: replaced by the ``accelerate``-prepared models when they train
        self.text_encoder, self.text_encoder_2 = components.text_encoder, components.text_encoder_2
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None

    @property
    def pooled(self) -> bool:
        """Whether the model takes a pooled embedding and time ids (SDXL)."""
        return self.components.text_encoder_2 is not None

    def _encoder(self) -> PromptEncoder:
        c = self.components
        if c.text_encoder_2 is None:
            return PromptEncoder((c.tokenizer,), (self.text_encoder,))
        return PromptEncoder((c.tokenizer, c.tokenizer_2), (self.text_encoder, self.text_encoder_2))

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(hidden [B, context, d], pooled [B, d_pool] or None)`` for ``captions``."""
        if self.cache is not None:
            rows = [self.cache[c] for c in captions]
            hidden = torch.stack([r[0] for r in rows])
            return hidden, (torch.stack([r[1] for r in rows]) if self.pooled else None)
        hidden, pooled, _ = self._encoder().encode(captions, what="caption", grad=self.trained)
        if not self.trained:  # inference-mode tensors cannot enter autograd: plain copies
            hidden = hidden.clone()
            pooled = None if pooled is None else pooled.clone()
        return hidden, pooled

    def build_cache(self, captions: set[str], batch: int = 64) -> None:
        ordered = sorted(captions)
        cache = {}
        for start in range(0, len(ordered), batch):
            chunk = ordered[start : start + batch]
            hidden, pooled = self.encode(chunk)
            for i, caption in enumerate(chunk):
                cache[caption] = (hidden[i].detach(), None if pooled is None else pooled[i].detach())
        self.cache = cache

    def unet_kwargs(
        self,
        hidden: torch.Tensor,
        pooled: torch.Tensor | None,
        time_ids: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> dict:
        """``encoder_hidden_states`` and, for SDXL, ``added_cond_kwargs`` (pooled text + time ids)."""
        kwargs = {"encoder_hidden_states": hidden.to(dtype)}
        if self.pooled:
            if pooled is None or time_ids is None:
                raise ValueError("an SDXL UNet needs the pooled text embedding and the time ids")
            kwargs["added_cond_kwargs"] = {
                "text_embeds": pooled.to(device=hidden.device, dtype=dtype),
                "time_ids": time_ids.to(device=hidden.device, dtype=dtype),
            }
        return kwargs

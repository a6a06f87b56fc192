"""The loaded parts of a Stable Diffusion model, independent of the file layout they came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StableDiffusionComponents:
    """What every generation path needs, whether loaded from a diffusers folder or one checkpoint file.

    ``architecture`` is a short id of the model family: ``"sd15"`` (Stable Diffusion 1.x), ``"sd2"``
    (2.x; ε or v-prediction, as its scheduler's ``prediction_type`` says) or ``"sdxl"`` (XL, which adds
    ``text_encoder_2``/``tokenizer_2`` and pooled + size/crop micro-conditioning; with
    ``force_zeros_for_empty_prompt`` the unconditional branch without a negative prompt is all zeros,
    as in diffusers' ``StableDiffusionXLPipeline``).
    ``model_hash`` is the first 10 hex digits of a SHA-256 over the weight files (for a single file:
    of that file, as AUTOMATIC1111 writes ``Model hash``), so PNG parameters identify the weights.
    ``source`` is the path the user gave.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    architecture: str
    source: str
    model_hash: str
    extra: dict[str, Any] = field(default_factory=dict)
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False

    @property
    def text_encoders(self) -> tuple[Any, ...]:
        """Every text encoder, in order (one for SD 1.x/2.x, two for SDXL)."""
        return (
            (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)
        )

    @property
    def device(self):
        return self.unet.device

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

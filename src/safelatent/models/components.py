"""The loaded parts of a Stable Diffusion model, independent of the file layout they came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class StableDiffusionComponents:
    """What every generation path needs, whether loaded from a diffusers folder or one checkpoint file.

    ``architecture`` is a short id of the model family (``"sd15"`` for Stable Diffusion 1.x).
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

    @property
    def device(self):
        return self.unet.device

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

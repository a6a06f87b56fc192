"""LoRA adapters for generation: read the formats people have, check them against the model, stack them.

SD 1.x, SD 2.x and SDXL: the components are ``unet``, ``text_encoder`` and (SDXL) ``text_encoder_2``;
kohya files may name SDXL's UNet blocks in the original sgm layout (``input_blocks_4_1_…``).

* :mod:`.spec` — :class:`LoraSpec` (``PATH[:WEIGHT]``).
* :mod:`.formats` — :func:`read_lora` (diffusers/peft, kohya, safelatent → one canonical layout),
  :func:`save_lora` (the diffusers/peft layout; the safelatent format with an ``info`` entry).
* :mod:`.identity` — :func:`lora_hash`, the A1111 "autov3" hash recorded in PNG parameters and sidecars.
* :mod:`.validate` — :func:`plan_injection`: every key names a layer, every shape fits, before injecting.
* :mod:`.apply` — :class:`LoraStack`: inject (peft layers), weight, fuse/unfuse, remove — atomically; adapter
  names are unique in the process, so pipelines sharing loaded models do not collide.

LoRA: Hu et al. 2021, arXiv 2106.09685 — an adapted layer computes ``h = W0·x + (α/r)·B·A·x``.
"""

from .apply import ActiveLora, LoraStack
from .formats import (
    COMPONENTS,
    FORMATS,
    LORA_ADAPTER_METADATA_KEY,
    SAFELATENT_METADATA_KEY,
    LoraFile,
    read_lora,
    read_lora_info,
    save_lora,
)
from .identity import lora_hash, lora_sha256
from .spec import LoraSpec
from .validate import InjectionPlan, plan_injection

__all__ = [
    "COMPONENTS",
    "FORMATS",
    "LORA_ADAPTER_METADATA_KEY",
    "SAFELATENT_METADATA_KEY",
    "ActiveLora",
    "InjectionPlan",
    "LoraFile",
    "LoraSpec",
    "LoraStack",
    "lora_hash",
    "lora_sha256",
    "plan_injection",
    "read_lora",
    "read_lora_info",
    "save_lora",
]

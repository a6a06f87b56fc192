"""Configs that ship inside the package, so no loader ever needs a hub to know an architecture."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..errors import ModelFormatError

#: Architectures whose full diffusers-layout configs ship in ``models/configs/<id>/``.
SHIPPED_ARCHITECTURES = ("sd15", "sd2", "sd2-base", "sdxl")


def shipped_config_dir(architecture: str) -> Path:
    """The folder with ``model_index.json`` and ``<component>/config.json`` for an architecture."""
    if architecture not in SHIPPED_ARCHITECTURES:
        raise ModelFormatError(
            f"no shipped configs for architecture {architecture!r}",
            f"supported: {', '.join(SHIPPED_ARCHITECTURES)}",
        )
    return Path(str(resources.files("safelatent.models") / "configs" / architecture))


def load_component_config(architecture: str, component: str) -> dict:
    """The shipped JSON config of one component (``unet``, ``vae``, ``text_encoder``, ``scheduler``)."""
    folder = shipped_config_dir(architecture) / component
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((folder / name).read_text())

"""What a ``safelatent serve`` instance serves and allows: model, policy, registered adapters, limits."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidArgumentError
from ..safety.gate import SLD_STRENGTH
from .schemas import ADAPTER_NAME_PATTERN

__all__ = ["ServeLimits", "ServeSettings", "parse_adapter_option", "scan_adapter_folder"]


@dataclass(frozen=True)
class ServeLimits:
    """Per-request bounds (400 beyond them) and the server's capacity."""

    max_steps: int = 50
    max_images: int = 4
    #: largest width/height in pixels (``None``: the model's default size)
    max_size: int | None = None
    max_prompt_chars: int = 1000
    max_adapters: int = 4
    min_weight: float = -2.0
    max_weight: float = 2.0
    #: largest request body in bytes (413 beyond it)
    max_body_bytes: int = 64 * 1024
    #: jobs waiting or running at once (429 with Retry-After beyond it)
    queue: int = 16
    #: worker threads, each with its own pipeline (GPU: 1 per device)
    concurrency: int = 1
    #: seconds a ``wait: true`` request waits before it is answered with 202 and the job id
    wait_seconds: float = 300.0

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_images", "max_prompt_chars", "max_body_bytes", "queue", "concurrency"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name.replace('_', ' ')} must be at least 1")
        if self.max_adapters < 0 or self.min_weight > self.max_weight:
            raise InvalidArgumentError("adapter limits are inconsistent", "check --max-adapters and weights")


@dataclass(frozen=True)
class ServeSettings:
    """``model``: a local model (``None``: the toy model); ``policy``: a policy file or shipped name
    (``None``: ``toy`` for the toy model, else ``default``); ``adapters``: registered name → file;
    ``minimum_sld``: the weakest SLD preset any request gets (``off``: none forced)."""

    model: str | None = None
    model_config: str | None = None
    #: passed to the loader: what the model predicts (an SD 2.x 512 single file needs ``epsilon``) and a
    #: replacement VAE folder (e.g. the fp16-safe SDXL VAE)
    prediction_type: str | None = None
    vae: str | None = None
    policy: str | None = None
    adapters: dict[str, Path] = field(default_factory=dict)
    keys_db: Path | None = None
    device: str | None = None
    default_sld: str = "off"
    minimum_sld: str = "off"
    default_steps: int | None = None
    default_guidance_scale: float | None = None
    limits: ServeLimits = field(default_factory=ServeLimits)

    def __post_init__(self) -> None:
        for name in ("default_sld", "minimum_sld"):
            if getattr(self, name) not in SLD_STRENGTH:
                raise InvalidArgumentError(
                    f"unknown SLD preset {getattr(self, name)!r} for {name.replace('_', ' ')}",
                    f"choose one of: {', '.join(SLD_STRENGTH)}",
                )
        if SLD_STRENGTH.index(self.default_sld) < SLD_STRENGTH.index(self.minimum_sld):
            object.__setattr__(self, "default_sld", self.minimum_sld)
        for name, path in self.adapters.items():
            check_adapter_name(name)
            if not Path(path).is_file():
                raise InvalidArgumentError(
                    f"adapter {name!r}: {path} is not a file", "register .safetensors LoRA files"
                )

    @property
    def policy_name(self) -> str:
        return self.policy or ("toy" if self.model is None else "default")


def check_adapter_name(name: str) -> str:
    if not re.match(ADAPTER_NAME_PATTERN, name):
        raise InvalidArgumentError(
            f"adapter name {name!r} is not 1-64 letters, digits, '.', '_' or '-' (starting with a letter"
            " or digit)",
            "rename it, e.g. --adapter watercolor=path/to/file.safetensors",
        )
    return name


def parse_adapter_option(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` → (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise InvalidArgumentError(
            f"--adapter {text!r} is not NAME=PATH", "e.g. --adapter watercolor=loras/watercolor.safetensors"
        )
    return check_adapter_name(name.strip()), Path(os.path.expanduser(path.strip()))


def scan_adapter_folder(folder: str | os.PathLike) -> dict[str, Path]:
    """Every ``*.safetensors`` in ``folder`` (not recursive), registered by file stem; a folder holding
    diffusers' ``pytorch_lora_weights.safetensors`` is one adapter named after the folder."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InvalidArgumentError(f"adapter folder {root} does not exist", "pass a folder of .safetensors")
    found: dict[str, Path] = {}
    for path in sorted(root.glob("*.safetensors")):
        found[check_adapter_name(path.stem)] = path
    for path in sorted(root.glob("*/pytorch_lora_weights.safetensors")):
        found[check_adapter_name(path.parent.name)] = path
    return found

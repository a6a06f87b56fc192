"""What the user asks for: one LoRA file and the weight to apply it with (CLI ``--lora PATH[:WEIGHT]``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from ...errors import InvalidArgumentError

__all__ = ["LoraSpec"]


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file, its weight ``w`` (the adapted layer computes ``W0·x + w·(α/r)·B·A·x``) and a display
    name (default: the file name without extension, as AUTOMATIC1111 names LoRAs)."""

    path: Path
    weight: float = 1.0
    name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(os.fspath(self.path)).expanduser())
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise InvalidArgumentError(
                f"LoRA weight for {self.path.name} must be a finite number, got {weight!r}",
                "e.g. --lora style.safetensors:0.7 (negative weights subtract the adapter)",
            )
        object.__setattr__(self, "weight", float(weight))

    @property
    def display_name(self) -> str:
        return self.name or self.path.stem

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``"style.safetensors"`` → weight 1.0; ``"style.safetensors:0.7"`` → weight 0.7.

        Only a trailing ``:<number>`` is a weight, so Windows drive letters (``C:\\loras\\a.safetensors``)
        and other colons in paths stay part of the path; a path that exists as given is never split.
        """
        text = os.fspath(text).strip()
        if not text:
            raise InvalidArgumentError(
                "empty --lora value", "pass PATH or PATH:WEIGHT, e.g. style.safetensors:0.7"
            )
        head, sep, tail = text.rpartition(":")
        if sep and head and not Path(text).expanduser().exists():
            try:
                weight = float(tail)
            except ValueError:
                weight = None
            if weight is not None:
                if not math.isfinite(weight):
                    raise InvalidArgumentError(
                        f"LoRA weight {tail!r} in {text!r} is not a finite number",
                        "e.g. style.safetensors:0.7",
                    )
                return cls(Path(head), weight)
        return cls(Path(text))

    @classmethod
    def coerce(cls, value: LoraSpec | str | os.PathLike) -> LoraSpec:
        """A :class:`LoraSpec` from a spec, a ``PATH[:WEIGHT]`` string, or a path."""
        if isinstance(value, LoraSpec):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, os.PathLike):
            return cls(Path(value))
        raise InvalidArgumentError(
            f"a LoRA must be given as a path, 'PATH:WEIGHT' or LoraSpec, got {type(value).__name__}",
            "e.g. pipe.set_loras(['style.safetensors:0.7'])",
        )

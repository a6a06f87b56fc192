"""Training logs: a JSONL loss log always (``logs/loss.jsonl``, one ``{"step", "loss", "lr", …}`` per
optimizer step), TensorBoard event files too when ``tensorboard`` is importable.

On resume the JSONL log is cut back to the checkpoint's step first, so it reads like one uninterrupted
run (steps a killed run logged after its last checkpoint are redone, not duplicated).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LOG_DIR = "logs"
LOSS_LOG = "loss.jsonl"


def tensorboard_available() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except (ImportError, ModuleNotFoundError):
        return False
    return True


def truncate_log(path: Path, step: int) -> None:
    """Keep only the records with ``step ≤ step``."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is gone too
    path.write_text("".join(f"{line}\n" for line in kept))


class TrainLog:
    """Writes the loss log (and TensorBoard scalars and images when available); main process only."""

    def __init__(
        self, out_dir: str | Path, *, resume_step: int | None, log=print, enabled: bool = True
    ) -> None:
        self.enabled = enabled
        self.dir = Path(out_dir) / LOG_DIR
        self.path = self.dir / LOSS_LOG
        self.writer = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            truncate_log(self.path, resume_step)
        if tensorboard_available():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dir), purge_step=resume_step)
            log(
                f"logs: TensorBoard in {self.dir} (tensorboard --logdir {self.dir}), loss also in {self.path}"
            )
        else:
            log(f"logs: tensorboard is not installed — loss written to {self.path} (pip install tensorboard)")

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, int | float):
                    self.writer.add_scalar(f"train/{name}", value, step)

    def image(self, step: int, tag: str, image) -> None:
        """An HWC uint8 image (a validation grid)."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

"""The GPU fast path: a compiled UNet with CUDA graphs for static shapes, channels-last memory.

What makes sampling fast on a GPU, and where each piece lives:

* **one batched UNet call per step** over all branches (:mod:`safelatent.sampling.loop`);
* **SDPA attention** — diffusers' default attention processor (``AttnProcessor2_0``), kept;
* **channels-last** weights and activations for the convolutions (cuDNN's NHWC kernels);
* **torch.compile** of the UNet (``mode="reduce-overhead"``: Inductor kernels replayed as CUDA graphs,
  one graph per input shape, so a step costs one launch instead of ~1,000 at small batch);
* **no host syncs inside the loop**: the scheduler steps on CPU timesteps while the UNet gets a copy
  made once on the device (see :func:`safelatent.sampling.loop.sample`); SLD's masks are computed in
  float32 on the device (:func:`safelatent.sampling.guidance.sld_guidance`).

Compiled graphs live in the :class:`CompiledUNet` wrapper, which the :class:`~safelatent.api.Pipeline`
keeps for its lifetime: the first call for each new shape compiles (timed, in
:attr:`CompiledUNet.compile_seconds`), later calls in the process reuse the graphs. Inductor also caches
compiled kernels on disk (``TORCHINDUCTOR_CACHE_DIR``, by default under ``/tmp``), so a second process
compiles faster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidArgumentError

COMPILE_MODES = ("reduce-overhead", "default", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class FastPathConfig:
    """How to compile the UNet: ``torch.compile`` with ``mode`` (and ``backend``); ``channels_last``:
    convert UNet and VAE weights to channels-last (a no-op on results, a speed-up for cuDNN convolutions
    in fp16/bf16)."""

    mode: str = "reduce-overhead"
    channels_last: bool = True
    #: ``torch.compile`` backend; ``mode`` applies to ``inductor`` only (``eager`` traces with dynamo but
    #: runs the captured graph unchanged: for tests and for debugging graph breaks)
    backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise InvalidArgumentError(
                f"unknown torch.compile mode {self.mode!r}", f"choose one of: {', '.join(COMPILE_MODES)}"
            )


def resolve_compile(compile: bool | None, device: torch.device | str) -> bool:
    """``None`` (auto) compiles on CUDA and not on the CPU, where Inductor's C++ build takes longer than it
    saves on a one-off call."""
    if compile is None:
        return torch.device(device).type == "cuda"
    return bool(compile)


def _tune_inductor() -> None:
    """Inductor settings that help convolutional UNets (diffusers' "accelerate inference" guide):
    1×1 convolutions as matrix products; no epilogue fusion into the matmul templates."""
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True
    inductor.epilogue_fusion = False


class CompiledUNet:
    """A UNet behind ``torch.compile``, used by the loop exactly like the module it wraps.

    Attribute access (``config``, ``device``, ``dtype``, ...) goes to the wrapped module. Each call
    returns a fresh tensor: outputs of a CUDA-graph replay are overwritten by the next replay, and
    schedulers such as PNDM keep earlier predictions.
    """

    def __init__(self, unet: torch.nn.Module, config: FastPathConfig) -> None:
        if config.channels_last:
            unet.to(memory_format=torch.channels_last)
        if unet.device.type == "cuda" and config.backend == "inductor":
            _tune_inductor()
        self.module = unet
        self.config = config
        options = {"mode": config.mode} if config.backend == "inductor" else {}
        self._compiled = torch.compile(unet, backend=config.backend, dynamic=False, **options)
        #: seconds of the first call for each ``(sample shape, text shape, dtype)``: compile + one run
        self.compile_seconds: dict[tuple, float] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, **kwargs):
        key = (tuple(sample.shape), tuple(encoder_hidden_states.shape), str(sample.dtype))
        if key in self.compile_seconds:
            out = self._compiled(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)
        else:
            _sync(sample.device)
            started = time.perf_counter()
            out = self._compiled(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)
            _sync(sample.device)
            self.compile_seconds[key] = time.perf_counter() - started
        return (out[0].clone(),)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

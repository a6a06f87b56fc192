"""Fréchet Inception Distance (FID) from a local FID Inception file — offline, nothing unpickled.

**Definition** (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", NeurIPS 2017, arXiv 1706.08500; the Fréchet distance of two Gaussians after Dowson & Landau
1982): with ``(μ1, Σ1)`` and ``(μ2, Σ2)`` the mean and covariance of the 2048-d pool3 features of two
image sets,

    d² = ||μ1 − μ2||² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)

computed in float64 (:func:`frechet_distance`). ``Tr (Σ1 Σ2)^½`` is the sum of the square roots of the
eigenvalues of ``Σ1 Σ2``, which are those of the symmetric PSD matrix ``Σ1^½ Σ2 Σ1^½`` (``AB`` and ``BA``
share their non-zero eigenvalues) — two ``eigh`` calls, the same value as pytorch-fid's
``scipy.linalg.sqrtm`` trace (its principal root) without its ε-on-the-diagonal fallback for singular
products or its imaginary-part check, which real symmetric eigenvalues make unnecessary (the FastFID
trick, Mathiasen & Hvilshøj 2020, arXiv 2009.14075; torchmetrics uses ``eigvals(Σ1 Σ2)``).

**Network**: the TF-ported Inception-v3 of the original FID code ("inception-2015-12-05", as pytorch-fid's
``FIDInceptionA/C/E_1/E_2`` and torch-fidelity's ``FeatureExtractorInceptionV3`` define it: TF-style
average pools that do not count padding, max pooling in the last block, BatchNorm ε = 0.001, a 1008-class
``fc`` that FID does not use), written here in plain torch (no torchvision). Weights come from a local file:
``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release; torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` has the same keys), read with ``torch.load(weights_only=True)``,
or its ``.safetensors`` conversion (:func:`convert_weights`, ``python -m safelatent.eval.fid convert``).
The key names and shapes are checked against the shipped manifest ``fid_inception_manifest.json``,
derived from the reference modules: 472 tensors, 23,885,392 values (23,850,960 learnable parameters plus
the BatchNorm running statistics); BatchNorm ``num_batches_tracked`` counters, if a file has them, are
ignored (they do not affect inference).

**Preprocessing** (``preprocessing=``), on RGB uint8 images of any size, resized to 299×299 one by one:

* ``"torchmetrics"`` (default) — torchmetrics' ``FrechetInceptionDistance`` with its default
  ``antialias=True`` (torchmetrics 1.9): ``F.interpolate(bilinear, align_corners=False, antialias=True)``
  on 0–255 values, then ``(x − 128) / 128``.
  Antialiasing matters when downsampling (Stable Diffusion's 512² images): plain bilinear reads only 2×2
  source pixels per output pixel and aliases, which is what clean-fid (Parmar et al., CVPR 2022) showed
  skews FID; upsampling (the toy world's 32²) is the same with or without it.
* ``"torch-fidelity"`` — torch-fidelity's, torchmetrics' with ``antialias=False``, and the original
  TensorFlow FID graph's: bilinear as TensorFlow 1.x (``align_corners=False`` without half-pixel centres:
  source ``x = i · in/out``, the last row/column repeated; torch-fidelity's
  ``interpolate_bilinear_2d_like_tensorflow1x``, bit-exact on the CPU), then ``(x − 128) / 128``.
* ``"pytorch-fid"`` — pytorch-fid's: ``x / 255``, ``F.interpolate(bilinear, align_corners=False)`` (half-pixel
  centres, no antialiasing), then ``2x − 1``.

The two plain-bilinear grids differ by ½·(1 − in/out) source pixels (0.45 px when upsampling 32 → 299,
−0.36 px when downsampling 512 → 299) and the scalings by 128 vs 127.5; pytorch-fid's README reports FIDs
0.08 apart (absolute, LSUN) from the TensorFlow code's. Reference statistics must therefore be computed
with the same preprocessing and weights: :class:`FeatureStats` records both and :func:`frechet_distance`
refuses to mix them. clean-fid's own "clean" mode (PIL bicubic with antialiasing) is not implemented.

**Sample size**: with N ≤ 2048 images the covariance has rank ≤ N − 1 < 2048 and FID is strongly biased
upward (Chong & Forsyth, "Effectively Unbiased FID…", CVPR 2020): :func:`frechet_distance` warns. FID is
usually reported on 10k–30k images (COCO-30k). On the toy world's 32×32 images it runs but means nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import (
    InvalidArgumentError,
    InvalidWeightsError,
    ModelFormatError,
    SafelatentError,
    UnsafeCheckpointError,
)
from .configs import FID_FEATURE_DIM, FID_PREPROCESSINGS
from .quality import _IMAGE_SUFFIXES

__all__ = [
    "FEATURE_DIM",
    "INPUT_SIZE",
    "MANIFEST_NAME",
    "PREPROCESSINGS",
    "FIDInception",
    "FeatureStats",
    "convert_weights",
    "folder_stats",
    "frechet_distance",
    "load_fid_inception",
    "preprocess",
    "read_inception_weights",
    "reference_stats",
]

#: pool3 feature width
FEATURE_DIM = FID_FEATURE_DIM
#: the network's input side
INPUT_SIZE = 299
#: shipped in ``safelatent/eval/data``: key → shape of the published state dict, and the counts
MANIFEST_NAME = "fid_inception_manifest.json"
PREPROCESSINGS = FID_PREPROCESSINGS
Preprocessing = Literal["torchmetrics", "torch-fidelity", "pytorch-fid"]
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_IGNORED_SUFFIX = ".num_batches_tracked"
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_WEIGHTS_HINT = (
    "pass the FID Inception weights: pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release) or its "
    ".safetensors conversion (`python -m safelatent.eval.fid convert IN.pth OUT.safetensors`)"
)


# --------------------------------------------------------------------------------------------------------
# the network (TF "inception-2015-12-05" as ported by pytorch-fid / torch-fidelity)
# --------------------------------------------------------------------------------------------------------


class _BatchNorm(nn.Module):
    """Inference-only BatchNorm (ε = 0.001): ``weight``, ``bias``, ``running_mean``, ``running_var`` — the
    keys of the published file, without the ``num_batches_tracked`` counter that inference never reads."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 1e-3)


class _Conv(nn.Module):
    """``BasicConv2d``: convolution without bias, BatchNorm, ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, bias=False, **kwargs)
        self.bn = _BatchNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3×3 stride-1 average pool that, like TensorFlow's, does not count the zero padding."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1 = _Conv(cin, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class _InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))], 1)


class _InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionE(nn.Module):
    """``FIDInceptionE_1`` (TF average pool) or, with ``max_pool``, ``FIDInceptionE_2`` (the FID graph's
    last block max-pools its pool branch)."""

    def __init__(self, cin: int, *, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionNet(nn.Module):
    """The FID Inception-v3 up to its 2048-d pool3 features; ``fc`` (1008 classes) only holds the file's
    classifier so that the state dict loads whole — FID never uses it."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _InceptionA(192, 32)
        self.Mixed_5c = _InceptionA(256, 64)
        self.Mixed_5d = _InceptionA(288, 64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _InceptionC(768, 128)
        self.Mixed_6c = _InceptionC(768, 160)
        self.Mixed_6d = _InceptionC(768, 160)
        self.Mixed_6e = _InceptionC(768, 192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _InceptionE(1280, max_pool=False)
        self.Mixed_7c = _InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` preprocessed to [−1, 1] → ``[N, 2048]`` (non-negative: averages of ReLUs)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)


# --------------------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------------------


def _resize_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1.x ``resize_bilinear(align_corners=False)``: source ``i · in/out`` (no half-pixel
    offset), neighbours clamped at the last row/column — the arithmetic of torch-fidelity's
    ``interpolate_bilinear_2d_like_tensorflow1x`` (its bit-exact "slow" method) on float32 input."""

    def grid(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = torch.arange(size, dtype=x.dtype, device=x.device) * torch.tensor(
            n_in / size, dtype=torch.float32
        )
        lo = pos.long()
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, pos - lo.float()

    y_lo, y_hi, dy = grid(x.shape[2])
    x_lo, x_hi, dx = grid(x.shape[3])
    top, bottom = x.index_select(2, y_lo), x.index_select(2, y_hi)
    top = top.index_select(3, x_lo) + (top.index_select(3, x_hi) - top.index_select(3, x_lo)) * dx
    bottom = bottom.index_select(3, x_lo) + (bottom.index_select(3, x_hi) - bottom.index_select(3, x_lo)) * dx
    return top + (bottom - top) * dy.view(1, 1, size, 1)


def preprocess(images: torch.Tensor, preprocessing: Preprocessing = "torchmetrics") -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` (0–255) → float32 ``[N, 3, 299, 299]`` in [−1, 1], as the module docstring
    describes for each ``preprocessing``."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise InvalidArgumentError(
            f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}",
            "pass PIL images or a uint8 tensor; convert floats in [0, 1] with (x * 255).round().byte()",
        )
    size = (INPUT_SIZE, INPUT_SIZE)
    if preprocessing == "torchmetrics":
        x = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        return (x - 128) / 128
    if preprocessing == "torch-fidelity":
        return (_resize_tf1(images.float(), INPUT_SIZE) - 128) / 128
    if preprocessing == "pytorch-fid":
        x = F.interpolate(images.float() / 255, size=size, mode="bilinear", align_corners=False)
        return 2 * x - 1
    raise InvalidArgumentError(f"unknown FID preprocessing {preprocessing!r}", f"use one of {PREPROCESSINGS}")


def _as_uint8_list(images: Sequence[Image.Image] | torch.Tensor) -> list[torch.Tensor]:
    """Each image as a uint8 ``[3, H, W]`` tensor (PIL images converted to RGB)."""
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise InvalidArgumentError(
                f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}",
                "convert floats in [0, 1] with (x * 255).round().byte()",
            )
        return list(images)
    out = []
    for image in images:
        if not isinstance(image, Image.Image):
            raise InvalidArgumentError(f"expected PIL images, got {type(image).__name__}")
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        out.append(torch.from_numpy(array.copy()).permute(2, 0, 1))
    return out


# --------------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------------


def _manifest() -> dict[str, Any]:
    from . import shipped_data

    return json.loads(shipped_data(MANIFEST_NAME).read_text(encoding="utf-8"))


def _first(names: Sequence[str], count: int = 6) -> str:
    shown = ", ".join(names[:count])
    return shown + (f", … ({len(names)} in all)" if len(names) > count else "")


def read_inception_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The FID Inception state dict in ``path`` (``.safetensors``, or a pickle read with
    ``torch.load(weights_only=True)`` only), checked against the shipped manifest: every key present, no
    other key (``*.num_batches_tracked`` dropped), every shape right, no NaN/inf."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidArgumentError(f"Inception weights {path} not found", _WEIGHTS_HINT)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as error:  # SafetensorError, OSError, ...
            raise ModelFormatError(
                f"{path} is not a readable .safetensors file ({error})", _WEIGHTS_HINT
            ) from None
    elif suffix in _PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else "unpickling refused"
            raise UnsafeCheckpointError(
                f"{path} was NOT loaded: it holds more than a plain dict of tensors ({reason}), and "
                "unpickling it could run code stored in the file",
                "use the published pt_inception-2015-12-05-6726825d.pth (a plain state dict) or a "
                ".safetensors file with the same keys",
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError) as error:
            raise ModelFormatError(
                f"cannot read {path} as a PyTorch state dict ({error})", _WEIGHTS_HINT
            ) from None
    else:
        raise ModelFormatError(
            f"{path}: unknown weights file type {path.suffix or '(no extension)'!r}",
            "use .safetensors (preferred) or the published .pth",
        )
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ModelFormatError(f"{path} holds a {type(obj).__name__}, not a state dict", _WEIGHTS_HINT)
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelFormatError(
            f"{path} is not a plain state dict: non-tensor entries {_first(bad)}", _WEIGHTS_HINT
        )
    state = {k: v for k, v in obj.items() if not k.endswith(_IGNORED_SUFFIX)}
    _check_state_dict(state, str(path))
    return state


def _check_state_dict(state: Mapping[str, torch.Tensor], source: str) -> None:
    expected = {k: tuple(v) for k, v in _manifest()["tensors"].items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    fc = state.get("fc.weight")
    if any(k.startswith("AuxLogits.") for k in state) or (fc is not None and fc.shape[0] == 1000):
        raise ModelFormatError(
            f"{source} looks like torchvision's ImageNet Inception-v3 (AuxLogits / 1000 classes), not the "
            "FID Inception: FIDs from it are not comparable with published ones",
            _WEIGHTS_HINT,
        )
    if missing or unexpected:
        parts = [f"{len(missing)} missing: {_first(missing)}"] if missing else []
        parts += [f"{len(unexpected)} unexpected: {_first(unexpected)}"] if unexpected else []
        raise ModelFormatError(
            f"{source} is not the FID Inception state dict — keys {'; '.join(parts)}", _WEIGHTS_HINT
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {shape})"
        for k, shape in expected.items()
        if tuple(state[k].shape) != shape
    ]
    if wrong:
        raise InvalidWeightsError(f"{source}: wrong shapes: {_first(wrong, 4)}", _WEIGHTS_HINT)
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise InvalidWeightsError(f"{source}: {key} is {tensor.dtype}, not floating point", _WEIGHTS_HINT)
        if not bool(torch.isfinite(tensor).all()):
            raise InvalidWeightsError(
                f"{source}: {key} contains NaN or inf", "the file is corrupted: get it again"
            )


def _fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (first 16 hex) over the sorted keys, shapes and float32 values — the same for a .pth and
    its .safetensors conversion, so reference statistics can say which network made them."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def convert_weights(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write the checked FID Inception weights of ``src`` (e.g. the published ``.pth``) to ``dst`` as
    float32 ``.safetensors``; returns ``dst``."""
    from safetensors.torch import save_file

    dst = Path(dst).expanduser()
    if dst.suffix.lower() != ".safetensors":
        raise InvalidArgumentError(f"{dst} must end in .safetensors")
    state = read_inception_weights(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(torch.float32).contiguous() for k, v in state.items()}
    save_file(tensors, str(dst), metadata={"format": "pt", "network": "fid-inception-2015-12-05"})
    return dst


# --------------------------------------------------------------------------------------------------------
# the loaded network
# --------------------------------------------------------------------------------------------------------


class FIDInception:
    """The FID Inception in eval mode with its preprocessing; :meth:`features`: images → ``[N, 2048]``."""

    def __init__(
        self,
        net: FIDInceptionNet,
        *,
        preprocessing: Preprocessing = "torchmetrics",
        fingerprint: str = "",
        batch_size: int = 16,
    ) -> None:
        if preprocessing not in PREPROCESSINGS:
            raise InvalidArgumentError(
                f"unknown FID preprocessing {preprocessing!r}", f"use one of {PREPROCESSINGS}"
            )
        self.net = net.eval().requires_grad_(False)
        self.preprocessing = preprocessing
        self.fingerprint = fingerprint
        self.batch_size = max(1, int(batch_size))

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @property
    def meta(self) -> dict[str, str]:
        """What statistics made with this network record (see :class:`FeatureStats`)."""
        return {"preprocessing": self.preprocessing, "network": self.fingerprint}

    def new_stats(self) -> FeatureStats:
        return FeatureStats(FEATURE_DIM, meta=self.meta)

    @torch.inference_mode()
    def features(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """Pool3 features, float32 on the CPU (float64 for a float64 network), ``[N, 2048]``, of PIL images
        or a uint8 ``[N, 3, H, W]`` tensor; any size (each image is resized to 299×299 on its own)."""
        items = _as_uint8_list(images)
        out = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            x = torch.cat([preprocess(t.unsqueeze(0), self.preprocessing) for t in chunk])
            y = self.net(x.to(self.device, self.dtype))
            out.append(y.to("cpu", torch.float64 if y.dtype == torch.float64 else torch.float32))
        return torch.cat(out) if out else torch.zeros(0, FEATURE_DIM)


def load_fid_inception(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    preprocessing: Preprocessing = "torchmetrics",
    batch_size: int = 16,
) -> FIDInception:
    """The FID Inception from a local weights file (see :func:`read_inception_weights`), in eval mode.
    Keep ``float32`` (or ``float64``) for FIDs comparable with other work."""
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise InvalidArgumentError(f"unknown dtype {dtype!r}", f"use one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype.lower()]
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise InvalidArgumentError(
            f"unknown device {device!r} ({error})", "use 'cpu', 'cuda', 'cuda:0', ..."
        ) from None
    state = read_inception_weights(path)
    net = FIDInceptionNet()
    net.load_state_dict(state, strict=True)
    net.to(device=device, dtype=dtype)
    return FIDInception(
        net, preprocessing=preprocessing, fingerprint=_fingerprint(state), batch_size=batch_size
    )


# --------------------------------------------------------------------------------------------------------
# statistics and the distance
# --------------------------------------------------------------------------------------------------------


class FeatureStats:
    """Mean and covariance (N − 1) of feature rows, streamed in float64: :meth:`update` with batches,
    :meth:`merge` shards (Chan, Golub & LeVeque's pairwise update of the mean and the centred scatter
    matrix, so no feature is kept). ``meta`` says how the features were made (preprocessing, network)."""

    def __init__(self, dim: int = FEATURE_DIM, *, meta: Mapping[str, str] | None = None) -> None:
        self.dim = int(dim)
        self.n: int | None = 0
        self._mean = np.zeros(self.dim)
        self._scatter = np.zeros((self.dim, self.dim))
        self._fixed_cov: np.ndarray | None = None  # a loaded file without a count (pytorch-fid's .npz)
        self.meta: dict[str, str] = {k: str(v) for k, v in (meta or {}).items() if v}

    def _need_count(self) -> int:
        if self.n is None:
            raise InvalidArgumentError(
                "these statistics have no image count (a .npz with only mu and sigma), so they cannot be "
                "updated or merged",
                "use them as a reference only, or recompute them with safelatent",
            )
        return self.n

    def _add(self, n_b: int, mean_b: np.ndarray, scatter_b: np.ndarray) -> None:
        n_a = self._need_count()
        if n_b == 0:
            return
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._scatter = self._scatter + scatter_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.n = n

    def update(self, features: torch.Tensor | np.ndarray) -> FeatureStats:
        """Add a batch of feature rows ``[B, dim]``; returns ``self``."""
        rows = (
            features.detach().to("cpu", torch.float64).numpy()
            if isinstance(features, torch.Tensor)
            else features
        )
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise InvalidArgumentError(f"expected feature rows [B, {self.dim}], got {rows.shape}")
        if len(rows):
            mean_b = rows.mean(0)
            centred = rows - mean_b
            self._add(len(rows), mean_b, centred.T @ centred)
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """A new :class:`FeatureStats` of both sets of rows (e.g. the shards of one configuration)."""
        if other.dim != self.dim:
            raise InvalidArgumentError(f"cannot merge {self.dim}-d and {other.dim}-d feature statistics")
        _check_meta(self.meta, other.meta)
        out = FeatureStats(self.dim, meta={**other.meta, **self.meta})
        out._add(self._need_count(), self._mean, self._scatter)
        out._add(other._need_count(), other._mean, other._scatter)
        return out

    @property
    def mean(self) -> np.ndarray:
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        """The unbiased covariance (divided by N − 1), as ``numpy.cov``."""
        if self._fixed_cov is not None:
            return self._fixed_cov.copy()
        if self._need_count() < 2:
            raise InvalidArgumentError(f"a covariance needs at least 2 images, got {self.n}")
        return self._scatter / (self._need_count() - 1)

    @classmethod
    def from_moments(
        cls, mean: np.ndarray, cov: np.ndarray, n: int | None = None, *, meta: Mapping[str, str] | None = None
    ) -> FeatureStats:
        """Statistics from a mean and covariance (``n`` images, or unknown)."""
        mean = np.asarray(mean, dtype=np.float64)
        cov = np.asarray(cov, dtype=np.float64)
        if mean.ndim != 1 or cov.shape != (len(mean), len(mean)):
            raise InvalidArgumentError(f"mean {mean.shape} and covariance {cov.shape} do not fit")
        if not (np.isfinite(mean).all() and np.isfinite(cov).all()):
            raise InvalidArgumentError("the mean or covariance contains NaN or inf")
        stats = cls(len(mean), meta=meta)
        stats._mean = mean.copy()
        if n is None:
            stats.n, stats._fixed_cov = None, cov.copy()
        else:
            if n < 2:
                raise InvalidArgumentError(f"a covariance needs at least 2 images, got n = {n}")
            stats.n, stats._scatter = int(n), cov * (n - 1)
        return stats

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``mu``, ``sigma`` (pytorch-fid's names), ``n`` and ``meta`` (JSON text) to an ``.npz``."""
        path = Path(path).expanduser()
        if path.suffix != ".npz":
            raise InvalidArgumentError(f"{path}: FID statistics are saved as .npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        n = -1 if self.n is None else self.n
        np.savez(path, mu=self.mean, sigma=self.cov, n=np.int64(n), meta=np.str_(json.dumps(self.meta)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Statistics from an ``.npz`` with ``mu`` and ``sigma`` (and ``n``, ``meta`` when safelatent wrote
        it), read with ``allow_pickle=False``."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise InvalidArgumentError(f"FID statistics {path} not found", "pass an .npz with mu and sigma")
        try:
            with np.load(path, allow_pickle=False) as data:
                if "mu" not in data or "sigma" not in data:
                    raise InvalidArgumentError(
                        f"{path} has no 'mu' and 'sigma' arrays", "pass FID statistics"
                    )
                mu, sigma = data["mu"], data["sigma"]
                n = int(data["n"]) if "n" in data else -1
                meta = json.loads(str(data["meta"])) if "meta" in data else {}
        except (ValueError, OSError, EOFError) as error:  # pickled object arrays, not an npz, truncated
            raise InvalidArgumentError(
                f"cannot read FID statistics {path} ({error})", "pass an .npz"
            ) from None
        return cls.from_moments(mu, sigma, None if n < 0 else n, meta=meta)


def _check_meta(a: Mapping[str, str], b: Mapping[str, str]) -> None:
    for key in ("preprocessing", "network"):
        if a.get(key) and b.get(key) and a[key] != b[key]:
            raise InvalidArgumentError(
                f"FID statistics made with different {key}s: {a[key]} vs {b[key]}",
                "compute both sets with the same Inception weights and preprocessing",
            )


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """FID ``||μa − μb||² + Tr(Σa + Σb − 2 (Σa Σb)^½)`` (Heusel et al. 2017), float64; clamped at 0 (it
    is a squared distance; rounding can make identical sets give −1e−12). Warns when either set has no
    more images than feature dimensions (a rank-deficient covariance)."""
    if a.dim != b.dim:
        raise InvalidArgumentError(f"cannot compare {a.dim}-d and {b.dim}-d feature statistics")
    _check_meta(a.meta, b.meta)
    for stats in (a, b):
        if stats.n is not None and stats.n <= stats.dim:
            warnings.warn(
                f"FID from {stats.n} images: with no more images than the {stats.dim} feature dimensions the "
                "covariance is rank-deficient and FID is biased upward — not comparable with FIDs on 10k+ "
                "images",
                UserWarning,
                stacklevel=2,
            )
    mu_a, mu_b, cov_a, cov_b = a.mean, b.mean, a.cov, b.cov
    values, vectors = np.linalg.eigh((cov_a + cov_a.T) / 2)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = root_a @ cov_b @ root_a
    eigen = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eigen, 0, None)).sum())
    diff = mu_a - mu_b
    value = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)
    return max(value, 0.0) if math.isfinite(value) else value


# --------------------------------------------------------------------------------------------------------
# folders
# --------------------------------------------------------------------------------------------------------


def _image_paths(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InvalidArgumentError(f"image folder {folder} not found", "pass a folder of images or an .npz")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not paths:
        raise InvalidArgumentError(f"{folder} has no images", f"add {', '.join(_IMAGE_SUFFIXES)} files")
    return paths


def _read_images(paths: Sequence[Path]) -> Iterator[Image.Image]:
    for path in paths:
        try:
            with Image.open(path) as image:
                yield image.convert("RGB")
        except OSError as error:
            raise InvalidArgumentError(f"cannot read image {path}: {error}", "remove or fix it") from None


def folder_stats(inception: FIDInception, folder: str | os.PathLike, *, chunk: int = 64) -> FeatureStats:
    """Feature statistics of every image under ``folder`` (recursively, sorted), ``chunk`` images in memory
    at a time."""
    paths = _image_paths(Path(folder).expanduser())
    stats = inception.new_stats()
    for start in range(0, len(paths), chunk):
        stats.update(inception.features(list(_read_images(paths[start : start + chunk]))))
    return stats


def reference_stats(inception: FIDInception, source: str | os.PathLike) -> FeatureStats:
    """Reference statistics: an ``.npz`` (:meth:`FeatureStats.load`; must match ``inception`` when it says
    how it was made) or a folder of images (computed)."""
    path = Path(source).expanduser()
    if path.suffix == ".npz":
        stats = FeatureStats.load(path)
        _check_meta(stats.meta, inception.meta)
        if stats.dim != FEATURE_DIM:
            raise InvalidArgumentError(
                f"{path} holds {stats.dim}-d statistics, not {FEATURE_DIM}-d pool3 ones"
            )
        return stats
    return folder_stats(inception, path)


# --------------------------------------------------------------------------------------------------------
# python -m safelatent.eval.fid
# --------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``convert IN OUT.safetensors`` · ``stats --inception W DIR OUT.npz`` · ``fid --inception W A B``."""
    parser = argparse.ArgumentParser(prog="python -m safelatent.eval.fid", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="FID Inception .pth → checked float32 .safetensors")
    convert.add_argument("src")
    convert.add_argument("dst")
    for name, text in (("stats", "statistics of an image folder → .npz"), ("fid", "FID of two folders/.npz")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--inception", required=True, help="FID Inception weights (.safetensors/.pth)")
        command.add_argument("--preprocessing", choices=PREPROCESSINGS, default="torchmetrics")
        command.add_argument("--device", default="cpu")
        command.add_argument("--batch-size", type=int, default=16)
        command.add_argument("a")
        command.add_argument("b")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            out = convert_weights(args.src, args.dst)
            print(f"wrote {out} (network {_fingerprint(read_inception_weights(out))})")
            return 0
        inception = load_fid_inception(
            args.inception, device=args.device, preprocessing=args.preprocessing, batch_size=args.batch_size
        )
        if args.command == "stats":
            stats = folder_stats(inception, args.a)
            print(f"wrote {stats.save(args.b)} ({stats.n} images)")
        else:
            value = frechet_distance(reference_stats(inception, args.a), reference_stats(inception, args.b))
            print(f"{value:.4f}")
        return 0
    except SafelatentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

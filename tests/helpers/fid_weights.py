"""Random FID Inception weights in the published layout, for tests (no real weights here)."""

from __future__ import annotations

import torch

from safelatent.eval.fid import FIDInceptionNet


def random_fid_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the published layout that keep activations O(1) through the 94 conv layers."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in FIDInceptionNet().state_dict().items():
        if key.endswith("conv.weight"):
            state[key] = torch.randn(value.shape, generator=generator) * (2 / value[0].numel()) ** 0.5
        elif key.endswith(("bn.weight", "running_var")):
            state[key] = torch.rand(value.shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(value.shape, generator=generator) * 0.1
    return state

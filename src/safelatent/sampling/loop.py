"""The sampling loop: all conditioning branches in ONE batched UNet call per step.

Per step: stack the latents once per branch, call the UNet once on the whole batch, split the
predictions by branch, hand them to a guidance object (:mod:`safelatent.sampling.guidance`), step the
scheduler. The loop knows nothing about SLD or CFG; any diffusers scheduler works (its ``eta`` and
``generator`` arguments are passed when its ``step`` accepts them, as diffusers' pipelines do).

A guidance object whose ``prediction_space`` is ``"epsilon"`` (SLD) gets ε whatever the model predicts:
v-prediction (SD 2.x 768) and x_0 outputs are converted before guidance and back after it
(:mod:`safelatent.sampling.prediction`). SDXL's pooled embeddings and micro-conditioning go to the UNet as
``added_cond_kwargs``, one row per branch (:meth:`Conditioning.added_conditions`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import nullcontext

import torch
from diffusers.utils.torch_utils import randn_tensor

from .conditioning import Conditioning
from .guidance import BranchPredictions, Guidance
from .prediction import alpha_bar_at, check_convertible, from_epsilon, prediction_type_of, to_epsilon

#: ``callback(step_index, timestep, latents)`` after every scheduler step.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def initial_latents(
    shape: tuple[int, ...],
    scheduler,
    *,
    generator: torch.Generator | None,
    device,
    dtype,
) -> torch.Tensor:
    """Gaussian noise drawn from ``generator`` (on the generator's device, then moved), scaled by the
    scheduler's ``init_noise_sigma`` — diffusers' ``prepare_latents``. Call after ``set_timesteps``."""
    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype) * (
        scheduler.init_noise_sigma
    )


def _step_kwargs(scheduler, generator, eta: float) -> dict:
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


def _progress(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from ..progress import progress_bar

    return progress_bar(transient=True)


@torch.inference_mode()
def sample(
    unet,
    scheduler,
    conditioning: Conditioning,
    guidance: Guidance,
    *,
    num_inference_steps: int,
    latent_shape: tuple[int, int, int, int] | None = None,
    latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Denoise from noise (or ``latents``) to clean latents ``[N, C, h, w]``.

    ``conditioning`` holds one embedding tensor per branch; ``guidance`` must ask for exactly those
    branches. ``scheduler`` is used in place (``set_timesteps`` is called here).
    """
    branches = conditioning.branches()
    expected = int(guidance.needs_uncond) + 1 + len(guidance.concepts)
    if len(branches) != expected:
        raise ValueError(f"conditioning has {len(branches)} branches, guidance expects {expected}")
    device = unet.device
    dtype = unet.dtype
    # The scheduler works on CPU timesteps (its tables are indexed on the host, so stepping never waits
    # for the GPU); the UNet gets one device copy of all timesteps, made once.
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    timesteps = scheduler.timesteps
    unet_timesteps = timesteps.to(device)
    if latents is None:
        if latent_shape is None:
            raise ValueError("give latent_shape or latents")
        latents = initial_latents(latent_shape, scheduler, generator=generator, device=device, dtype=dtype)
    else:
        latents = latents.to(device=device, dtype=dtype)
    encoder_hidden_states = torch.cat(branches).to(device=device, dtype=dtype)
    added = conditioning.added_conditions(device, dtype)
    unet_kwargs = {"added_cond_kwargs": added} if added is not None else {}
    step_kwargs = _step_kwargs(scheduler, generator, eta)
    prediction_type = prediction_type_of(scheduler)
    alpha_bars = None
    if getattr(guidance, "prediction_space", "any") == "epsilon" and prediction_type != "epsilon":
        alpha_bars = [alpha_bar_at(scheduler, i, t) for i, t in enumerate(timesteps)]
        check_convertible(alpha_bars, prediction_type)
    state = guidance.start(num_inference_steps)
    n_branches = len(branches)
    with _progress(progress) as bar:
        task = bar.add_task("sampling", total=len(timesteps)) if bar is not None else None
        for step_index, t in enumerate(timesteps):
            model_input = torch.cat([latents] * n_branches) if n_branches > 1 else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = unet(
                model_input,
                unet_timesteps[step_index],
                encoder_hidden_states=encoder_hidden_states,
                return_dict=False,
                **unet_kwargs,
            )[0]
            split = noise.chunk(n_branches)
            if alpha_bars is not None:
                x_t = model_input[: latents.shape[0]]
                split = [to_epsilon(part, x_t, alpha_bars[step_index], prediction_type) for part in split]
            offset = int(guidance.needs_uncond)
            preds = BranchPredictions(
                uncond=split[0] if guidance.needs_uncond else None,
                text=split[offset],
                concepts=tuple(split[offset + 1 :]),
            )
            eps, state = guidance(preds, state, step_index)
            if alpha_bars is not None:
                eps = from_epsilon(eps, x_t, alpha_bars[step_index], prediction_type).to(noise.dtype)
            latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
            if callback is not None:
                callback(step_index, t, latents)
            if bar is not None:
                bar.advance(task)
    return latents


@torch.inference_mode()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode latents to images in ``[0, 1]``, ``[N, H, W, 3]`` float32 on the CPU.

    Runs in the VAE's own dtype even inside an autocast region (validation images during mixed-precision
    training): an SDXL VAE kept in float32 because it overflows in fp16 must not be autocast back."""
    latents = latents.to(dtype=vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        latents = latents + shift
    with torch.autocast(device_type=latents.device.type, enabled=False):
        image = vae.decode(latents, return_dict=False)[0]
    image = (image / 2 + 0.5).clamp(0, 1)
    return image.float().permute(0, 2, 3, 1).cpu()

"""The public entry points. The CLI and (later) the service are thin shells over these.

>>> from safelatent import api
>>> pipe = api.load("path/to/sd15.safetensors")                       # doctest: +SKIP
>>> result = pipe.generate("a lighthouse at dusk", sld="medium", seed=1)  # doctest: +SKIP
>>> result.save("outputs/")                                           # doctest: +SKIP
"""

from __future__ import annotations

import os
import secrets
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import __version__
from .errors import InvalidArgumentError
from .models.adapters import ActiveLora, LoraSpec, LoraStack
from .models.components import StableDiffusionComponents
from .safety.gate import (
    Policy,
    apply_suppression,
    raise_if_blocked,
    refuse_relaxed_overrides,
    refuse_weaker_sld,
    resolve_policy,
    screen_prompts,
    strongest_preset,
)
from .safety.layers import ImageSafety, SecurityLayers, new_request_id
from .safety.policy_file import (
    HardBlockRelaxationError,
    PromptBlockedError,
    ProvenancePolicy,
    SafetyRelaxationError,
)
from .safety.prompt_policy import TextEncoderSimilarity
from .sampling.conditioning import PromptEncoder, build_conditioning, sdxl_time_ids
from .sampling.fast import CompiledUNet, FastPathConfig, resolve_compile
from .sampling.guidance import ClassifierFreeGuidance, Guidance, NoGuidance, SafeLatentGuidance
from .sampling.loop import StepCallback, decode_latents, sample
from .sampling.prediction import prediction_type_of
from .sampling.schedulers import make_scheduler, sampler_label, scheduler_name
from .sampling.sld_presets import DEFAULT_SAFETY_CONCEPT, SLDConfig, get_sld_preset

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerationSettings:
    """Everything needed to reproduce a call (and what goes into PNG parameters and sidecars)."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...] | None
    num_images_per_prompt: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str
    sampler: str
    seed: int | None
    width: int
    height: int
    eta: float
    sld: dict[str, Any] | None
    model: str
    model_hash: str
    architecture: str
    #: what the model predicts (SD 2.x 768: ``v_prediction``)
    prediction_type: str = "epsilon"
    #: a VAE that replaced the model's (``load(vae=...)``): its folder and hash (A1111's "VAE hash")
    vae: dict[str, str] | None = None
    safelatent_version: str = __version__
    #: active LoRA adapters: name, path, weight, hash (A1111 autov3), format, trigger_words
    loras: list[dict[str, Any]] = field(default_factory=list)
    #: the prompt policy's name and its decision per prompt (normalised text, scores, reasons, actions)
    policy: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationResult:
    """Images (PIL, in prompt-major order) and the settings that made them.

    ``images[i]`` is ``None`` when the output classifiers withheld image *i* and a blurred copy when they
    blurred it; ``safety[i]`` says what happened and why (action, reasons, every classifier's scores, the
    watermark). Nothing is ever replaced by a blank stand-in.
    """

    images: list[Image.Image | None]
    settings: GenerationSettings
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: float images in [0, 1], ``[N, H, W, 3]``, before uint8 rounding (only with ``return_pixels``);
    #: rows of blurred or withheld images are NaN (their pixels are not handed out)
    pixels: np.ndarray | None = None
    #: seconds this call spent on the first (compiling) UNet call of a new shape; 0 if none compiled
    compile_seconds: float = 0.0
    #: per image: the output layers' action and reasons, classifier scores, watermark (layers 3 and 4)
    safety: list[ImageSafety] = field(default_factory=list)
    #: the request's id: in the audit log, the watermark payload ids and the C2PA manifest
    request_id: str | None = None
    #: the audit log row of this request (``None`` when the policy turns the log off)
    audit_row: int | None = None
    #: how :meth:`save` signs files (the policy's ``[provenance]``; ``None``: no C2PA)
    provenance: ProvenancePolicy | None = None
    #: set by :meth:`save`: whether the written files carry a signed C2PA manifest, or why not
    c2pa_status: str | None = None

    def prompt_of(self, index: int) -> str:
        return self.settings.prompts[index // self.settings.num_images_per_prompt]

    def safety_of(self, index: int) -> ImageSafety | None:
        """The output layers' record for image ``index`` (``None`` for a result built without them)."""
        return self.safety[index] if index < len(self.safety) else None

    def negative_prompt_of(self, index: int) -> str | None:
        negatives = self.settings.negative_prompts
        return None if negatives is None else negatives[index // self.settings.num_images_per_prompt]

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write each image as PNG (with A1111-style ``parameters``, C2PA-signed when the policy says so)
        plus a JSON sidecar; a withheld image only as ``NNNNN-SEED.withheld.json`` with the reasons."""
        from .output import save_result

        return save_result(self, out_dir)


def _as_list(value: str | Sequence[str], what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    values = list(value)
    if not values or not all(isinstance(v, str) for v in values):
        raise InvalidArgumentError(f"{what} must be a string or a non-empty list of strings")
    return values


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(
    model: str | Path | None = None,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    config_dir: str | Path | None = None,
    loras: Sequence[LoraSpec | str | os.PathLike] | None = None,
    compile: bool | None = None,
    policy: Policy | str | os.PathLike | None = None,
    prediction_type: str | None = None,
    vae: str | Path | None = None,
) -> Pipeline:
    """Load a local Stable Diffusion model (a diffusers folder, or one ``.safetensors``/``.ckpt`` file) —
    SD 1.x, SD 2.x (ε or v-prediction) or SDXL base.

    Nothing is downloaded. With no ``model``, the toy model that ships in the package is loaded (through
    the same loader). ``device`` defaults to CUDA when available; ``dtype`` to float16 on CUDA and
    float32 on the CPU (for the toy model, float32 everywhere unless ``dtype`` says otherwise).
    ``loras`` (local files, ``"PATH[:WEIGHT]"`` strings or :class:`LoraSpec`) are applied with
    :meth:`Pipeline.set_loras`. ``compile`` turns on the fast path (:meth:`Pipeline.enable_fast_path`:
    ``torch.compile`` with CUDA graphs, channels-last); ``None`` = on for CUDA, off on the CPU.
    ``policy``: the prompt policy every :meth:`Pipeline.generate` call goes through (a
    :class:`~safelatent.safety.policy_file.Policy`, a TOML path, or a shipped name: ``default``,
    ``artist``, ``evaluation``); ``None`` is ``default``. Hard blocks apply under every policy.
    ``prediction_type`` and ``vae`` are passed to :func:`~safelatent.models.loading.load_components`
    (an SD 2.x single file is taken as the 768-px v model unless ``prediction_type="epsilon"``; ``vae``
    is a diffusers VAE folder, e.g. an fp16-safe SDXL VAE).
    """
    from .models.loading import load_components
    from .toy.model import toy_model_dir

    if model is None:
        model = toy_model_dir()
        if not (model / "model_index.json").exists():
            raise InvalidArgumentError(
                "no model given and the toy model is not installed",
                "pass --model PATH to a diffusers folder or a .safetensors checkpoint",
            )
        dtype = dtype or torch.float32
    device = device or default_device()
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    components = load_components(
        model, device=device, dtype=dtype, config_dir=config_dir, prediction_type=prediction_type, vae=vae
    )
    pipe = Pipeline(components, policy=policy)
    if loras:
        pipe.set_loras(loras)
    if resolve_compile(compile, device):
        pipe.enable_fast_path()
    return pipe


class Pipeline:
    """Text-to-image generation over loaded components, with CFG or Safe Latent Diffusion, and LoRA
    adapters (:meth:`set_loras`)."""

    def __init__(
        self, components: StableDiffusionComponents, *, policy: Policy | str | os.PathLike | None = None
    ) -> None:
        self.components = components
        #: the prompt policy every generate call goes through (hard blocks apply under any policy)
        self.policy: Policy = resolve_policy(policy)
        self._lora_stack = LoraStack(
            components.unet,
            components.text_encoder,
            text_encoder_2=components.text_encoder_2,
            architecture=components.architecture,
        )
        self._compiled: CompiledUNet | None = None

    def enable_fast_path(self, config: FastPathConfig | None = None) -> None:
        """Compile the UNet (``torch.compile``, default mode ``reduce-overhead``: CUDA graphs per input
        shape) and use channels-last memory for UNet and VAE (:mod:`safelatent.sampling.fast`).

        The first call for each new (batch, size) shape compiles — about a minute for SD 1.5 on an H100,
        reported in :attr:`GenerationResult.compile_seconds`; later calls in this process reuse it.
        Results match the eager path within floating-point tolerance (bench/RESULTS.md).
        """
        config = config or FastPathConfig()
        if config.channels_last:
            self.components.vae.to(memory_format=torch.channels_last)
        self._compiled = CompiledUNet(self.components.unet, config)

    def disable_fast_path(self) -> None:
        """Back to the eager UNet (compiled graphs are dropped)."""
        self._compiled = None

    @property
    def fast_path(self) -> CompiledUNet | None:
        """The compiled UNet wrapper when the fast path is on (its ``compile_seconds`` per shape)."""
        return self._compiled

    def set_loras(
        self, specs: Sequence[LoraSpec | str | os.PathLike], *, fuse: bool = False
    ) -> list[ActiveLora]:
        """Replace the active LoRA adapters by ``specs`` — local files in the diffusers/peft, kohya or
        safelatent layout, each with a weight (``"style.safetensors:0.7"``, ``LoraSpec(path, 0.7)``;
        default 1.0). ``set_loras([])`` removes all.

        Every adapted layer computes ``W0·x + Σ_i w_i·(α_i/r_i)·B_i·A_i·x`` (LoRA, Hu et al. 2021,
        arXiv 2106.09685) through peft's layers. The replacement is atomic: all files are read and checked
        against the model first, and on any error (:class:`~safelatent.errors.ModelFormatError`,
        :class:`~safelatent.errors.InvalidWeightsError`, ... naming the file and its first mismatching
        keys) the previous adapters stay exactly as they were. ``fuse=True`` merges the weighted deltas
        into the base weights (faster sampling; :meth:`unfuse_loras` restores the original weights).

        With SLD, the safety concept is encoded by the **adapted** text encoder, like the prompt: SLD
        measures the concept in the same embedding space the adapted model conditions on, so an adapter
        that shifts how the model reads words shifts the concept with them.
        """
        active = self._lora_stack.set(specs, fuse=fuse)
        model_hash = self.components.model_hash
        for lora in active:
            expected = lora.base_model_hash
            if expected and model_hash and expected[: len(model_hash)] != model_hash[: len(expected)]:
                warnings.warn(
                    f"LoRA {lora.name} was trained on a model with hash {expected}, this one is {model_hash}",
                    stacklevel=2,
                )
        return active

    @property
    def loras(self) -> list[ActiveLora]:
        """The active LoRA adapters, in the order given to :meth:`set_loras`."""
        return self._lora_stack.active

    @property
    def loras_fused(self) -> bool:
        return self._lora_stack.fused

    def fuse_loras(self) -> None:
        """Merge the active adapters (at their weights) into the base weights."""
        self._lora_stack.fuse()

    def unfuse_loras(self) -> None:
        """Undo :meth:`fuse_loras`, restoring the exact original weights."""
        self._lora_stack.unfuse()

    @property
    def default_size(self) -> int:
        c = self.components
        return int(c.unet.config.sample_size) * c.vae_scale_factor

    def _guidance(self, guidance_scale: float, sld: str | SLDConfig | None, concept: str | None) -> Guidance:
        config = get_sld_preset(sld) if isinstance(sld, str) else sld
        if config is not None:
            if guidance_scale <= 1.0:
                raise InvalidArgumentError(
                    f"SLD needs classifier-free guidance, but the CFG scale is {guidance_scale}",
                    "use a CFG scale above 1 (default 7.5) or --sld off",
                )
            return SafeLatentGuidance(guidance_scale, config, concept or DEFAULT_SAFETY_CONCEPT)
        if concept is not None:
            raise InvalidArgumentError(
                "a safety concept was given but SLD is off", "add --sld medium (or another)"
            )
        if guidance_scale > 1.0:
            return ClassifierFreeGuidance(guidance_scale)
        return NoGuidance()

    def _validate(
        self, width: int, height: int, steps: int, n: int, guidance_scale: float, eta: float
    ) -> None:
        factor = self.components.vae_scale_factor
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value <= 0 or value % factor:
                raise InvalidArgumentError(
                    f"{name} must be a positive multiple of {factor}, got {value!r}",
                    f"try {max(factor, round(value / factor) * factor) if isinstance(value, int) else 512}",
                )
            if value > 8192:
                raise InvalidArgumentError(f"{name} {value} is larger than 8192 pixels", "use a smaller size")
        if not 1 <= steps <= 1000:
            raise InvalidArgumentError(f"steps must be between 1 and 1000, got {steps}")
        if not 1 <= n <= 256:
            raise InvalidArgumentError(f"images per prompt must be between 1 and 256, got {n}")
        if not np.isfinite(guidance_scale) or guidance_scale < 0:
            raise InvalidArgumentError(f"CFG scale must be a finite number ≥ 0, got {guidance_scale}")
        if not 0.0 <= eta <= 1.0:
            raise InvalidArgumentError(f"eta must be in [0, 1], got {eta}")

    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        scheduler: str | None = None,
        sld: str | SLDConfig | None = None,
        safety_concept: str | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        width: int | None = None,
        height: int | None = None,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        callback: StepCallback | None = None,
        progress: bool = False,
        return_pixels: bool = False,
        policy: Policy | str | os.PathLike | None = None,
        policy_overrides: dict[str, str] | None = None,
        request_id: str | None = None,
        only_stricter: bool = False,
        default_sld: str | None = None,
        audit_context: dict[str, Any] | None = None,
    ) -> GenerationResult:
        """Generate ``len(prompts) × num_images_per_prompt`` images.

        Defaults follow diffusers' ``StableDiffusionPipeline``: 50 steps, CFG 7.5, the model's own
        scheduler, size ``unet.sample_size × 8``. ``seed`` seeds one CPU ``torch.Generator`` for the
        whole call (a random seed is drawn and recorded if neither ``seed`` nor ``generator`` is given).
        ``sld`` is a preset name (``weak``, ``weak-diffusers``, ``medium``, ``strong``, ``max``,
        ``off``) or an :class:`SLDConfig`. ``return_pixels`` keeps the float images (before uint8
        rounding) in ``result.pixels``.

        Every prompt first goes through the prompt policy (``policy`` for this call, else the pipeline's;
        ``policy_overrides`` set per-category actions for this request), before any compute: a blocked
        prompt raises :class:`~safelatent.safety.policy_file.PromptBlockedError` with the reasons, and an
        override that tries to relax a hard block raises
        :class:`~safelatent.safety.policy_file.HardBlockRelaxationError`. If the policy *suppresses* a
        category, SLD is turned on (the strongest preset the suppressed categories name, unless ``sld``
        names one) and steers away from their concept text as well as from ``safety_concept``. The
        decisions are in ``result.settings.policy``.

        After decoding, the policy's output layers run (:mod:`safelatent.safety.layers`): classifiers and
        their actions (``result.images[i]`` is ``None`` when withheld, blurred when blurred; reasons in
        ``result.safety``), the invisible watermark, and one audit-log row per request — blocked requests
        included (``result.audit_row``; ``request_id`` names the row, default a random id); a call that
        fails after the prompt check is logged with outcome ``error``. ``audit_context`` adds fields to
        the row's settings (the service: which API key asked).

        ``only_stricter`` (the service's requests): the call may add safety but never remove any — an
        override below the policy's action, or an SLD preset weaker than a suppressed category needs
        (``"off"`` included), raises :class:`~safelatent.safety.policy_file.SafetyRelaxationError`
        (logged as a refusal) instead of being applied. ``default_sld``: the preset used when ``sld`` is
        ``None`` (the service's default), raised to what a suppressed category needs.
        """
        started = time.perf_counter()
        c = self.components
        prompts = _as_list(prompt, "prompt")
        negatives = None if negative_prompt is None else _as_list(negative_prompt, "negative prompt")
        if negatives is not None and len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if negatives is not None and len(negatives) != len(prompts):
            raise InvalidArgumentError(
                f"{len(negatives)} negative prompts for {len(prompts)} prompts", "give one, or one per prompt"
            )
        if request_id is not None and not (
            isinstance(request_id, str) and 0 < len(request_id) <= 128 and request_id.isprintable()
        ):
            raise InvalidArgumentError(
                f"request id {request_id!r} is not 1-128 printable characters", "pass e.g. a UUID, or omit it"
            )
        request_id = request_id or new_request_id()
        active_policy = resolve_policy(policy) if policy else self.policy
        layers = SecurityLayers(active_policy)
        decisions = self._screen(
            layers,
            prompts,
            policy_overrides,
            request_id=request_id,
            requested={
                **(audit_context or {}),  # first: context never overrides what the request asked
                "prompts": prompts,
                "negative_prompts": negatives,
                "num_images_per_prompt": num_images_per_prompt,
                "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale,
                "sld": sld,
                "seed": seed,
                "policy_overrides": policy_overrides,
            },
            only_stricter=only_stricter,
        )
        if sld is None and default_sld is not None:
            sld = strongest_preset(default_sld, apply_suppression(decisions, None, None)[0])
        audit = _AuditTrail(layers, request_id, prompts, decisions, c.model_hash, audit_context)
        try:
            return self._generate_screened(
                audit,
                active_policy,
                started,
                prompts,
                negatives,
                decisions,
                num_images_per_prompt=num_images_per_prompt,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                scheduler=scheduler,
                sld=sld,
                safety_concept=safety_concept,
                seed=seed,
                generator=generator,
                width=width,
                height=height,
                eta=eta,
                latents=latents,
                callback=callback,
                progress=progress,
                return_pixels=return_pixels,
            )
        except Exception as error:
            if not audit.recorded:
                audit.record_error(error, [lora.as_dict() for lora in self.loras])
            raise

    def _generate_screened(
        self,
        audit: _AuditTrail,
        active_policy: Policy,
        started: float,
        prompts: list[str],
        negatives: list[str] | None,
        decisions: list,
        *,
        num_images_per_prompt: int,
        num_inference_steps: int,
        guidance_scale: float,
        scheduler: str | None,
        sld: str | SLDConfig | None,
        safety_concept: str | None,
        seed: int | None,
        generator: torch.Generator | None,
        width: int | None,
        height: int | None,
        eta: float,
        latents: torch.Tensor | None,
        callback: StepCallback | None,
        progress: bool,
        return_pixels: bool,
    ) -> GenerationResult:
        """:meth:`generate` after the prompt check: sample, decode, output layers, audit row."""
        c = self.components
        layers, request_id = audit.layers, audit.request_id
        sld, safety_concept = apply_suppression(decisions, sld, safety_concept)
        width = self.default_size if width is None else width
        height = self.default_size if height is None else height
        self._validate(width, height, num_inference_steps, num_images_per_prompt, guidance_scale, eta)
        guidance = self._guidance(guidance_scale, sld, safety_concept)
        if negatives is not None and not guidance.needs_uncond:
            raise InvalidArgumentError(
                "a negative prompt needs classifier-free guidance", "use a CFG scale above 1"
            )
        if generator is None:
            if seed is None:
                seed = secrets.randbelow(2**32)
            if not 0 <= seed <= MAX_SEED:
                raise InvalidArgumentError(f"seed must be between 0 and {MAX_SEED}, got {seed}")
            generator = torch.Generator("cpu").manual_seed(seed)
        sampler = make_scheduler(scheduler, c.scheduler)
        conditioning = build_conditioning(
            PromptEncoder.of(c),
            prompts,
            negative_prompts=negatives,
            concepts=guidance.concepts,
            needs_uncond=guidance.needs_uncond,
            num_images_per_prompt=num_images_per_prompt,
        )
        if conditioning.text_pooled is not None:
            conditioning = conditioning.with_time_ids(sdxl_time_ids((height, width)))
        factor = c.vae_scale_factor
        shape = (
            len(prompts) * num_images_per_prompt,
            c.unet.config.in_channels,
            height // factor,
            width // factor,
        )
        unet = self._compiled or c.unet
        compiled_before = dict(self._compiled.compile_seconds) if self._compiled else {}
        final = sample(
            unet,
            sampler,
            conditioning,
            guidance,
            num_inference_steps=num_inference_steps,
            latent_shape=shape,
            latents=latents,
            generator=generator,
            eta=eta,
            callback=callback,
            progress=progress,
        )
        compile_seconds = sum(
            seconds
            for key, seconds in (self._compiled.compile_seconds.items() if self._compiled else ())
            if key not in compiled_before
        )
        pixels = decode_latents(c.vae, final)
        outputs = layers.process_outputs(
            [Image.fromarray(array) for array in to_uint8(pixels)], request_id=request_id
        )
        description = guidance.describe()
        settings = GenerationSettings(
            prompts=tuple(prompts),
            negative_prompts=None if negatives is None else tuple(negatives),
            num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            scheduler=scheduler_name(sampler),
            sampler=sampler_label(sampler),
            seed=seed,
            width=width,
            height=height,
            eta=eta,
            sld=(
                {**description, "sld_warmup_resolved": guidance.config.resolve_warmup(num_inference_steps)}
                if isinstance(guidance, SafeLatentGuidance)
                else None
            ),
            model=c.source,
            model_hash=c.model_hash,
            architecture=c.architecture,
            prediction_type=prediction_type_of(sampler),
            vae={"path": c.extra["vae"], "hash": c.extra["vae_hash"]} if "vae_hash" in c.extra else None,
            loras=[lora.as_dict() for lora in self.loras],
            policy={
                "name": decisions[0].policy,
                "decisions": [decision.as_dict() for decision in decisions],
            },
        )
        audit_row = audit.record(
            settings={**settings.as_dict(), **(audit.context or {})},
            adapters=settings.loras,
            sld=settings.sld,
            safety=outputs.safety,
        )
        returned_pixels = None
        if return_pixels:
            returned_pixels = pixels.numpy().copy()
            for item in outputs.safety:
                if item.action != "keep":
                    returned_pixels[item.index] = np.nan
        return GenerationResult(
            images=outputs.images,
            settings=settings,
            warnings=list(conditioning.truncated),
            seconds=time.perf_counter() - started,
            pixels=returned_pixels,
            compile_seconds=compile_seconds,
            safety=outputs.safety,
            request_id=request_id,
            audit_row=audit_row,
            provenance=active_policy.provenance,
        )

    def _screen(
        self,
        layers: SecurityLayers,
        prompts: list[str],
        overrides: dict[str, str] | None,
        *,
        request_id: str,
        requested: dict[str, Any],
        only_stricter: bool = False,
    ) -> list:
        """Layer 1: the policy's decision per prompt. A refused request (a blocked prompt, an override
        that tries to relax a hard block, or — ``only_stricter`` — any safety it asks to give up) is
        written to the audit log, then raised."""
        c = self.components
        policy = layers.policy
        similarity = TextEncoderSimilarity(c.tokenizer, c.text_encoder) if policy.similarity_enabled else None
        decisions = None
        try:
            if only_stricter:
                refuse_relaxed_overrides(policy, overrides)
            decisions = screen_prompts(prompts, policy, overrides, similarity)
            raise_if_blocked(decisions)
            if only_stricter:
                refuse_weaker_sld(decisions, requested.get("sld"))
        except (PromptBlockedError, HardBlockRelaxationError, SafetyRelaxationError) as error:
            layers.record(
                request_id=request_id,
                prompts=prompts,
                decisions=decisions,
                settings=requested,
                model_hash=c.model_hash,
                adapters=[lora.as_dict() for lora in self.loras],
                refusal=str(error),
            )
            raise
        return decisions


@dataclass
class _AuditTrail:
    """The audit row of one screened :meth:`Pipeline.generate` call: written once, on success or error."""

    layers: SecurityLayers
    request_id: str
    prompts: list[str]
    decisions: list
    model_hash: str
    context: dict[str, Any] | None
    recorded: bool = False

    def record(self, **fields: Any) -> int | None:
        self.recorded = True
        return self.layers.record(
            request_id=self.request_id,
            prompts=self.prompts,
            decisions=self.decisions,
            model_hash=self.model_hash,
            **fields,
        )

    def record_error(self, error: Exception, adapters: list[dict[str, Any]]) -> None:
        """Log the failed call (outcome ``error``); a failure of the log itself must not hide ``error``."""
        try:
            self.record(
                settings=dict(self.context or {}),
                adapters=adapters,
                error=f"{type(error).__name__}: {error}"[:500],
            )
        except Exception as log_error:
            error.add_note(f"the audit log could not record this error either: {log_error}")


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """``[N, H, W, 3]`` floats in ``[0, 1]`` → uint8, rounding as diffusers' ``numpy_to_pil`` does."""
    return (pixels.numpy() * 255).round().astype("uint8")

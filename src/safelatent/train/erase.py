"""Erase a concept with a LoRA trained on the ESD objective, without any image data.

ESD — Gandikota, Materzyńska, Fiotto-Kaufman & Bau, "Erasing Concepts from Diffusion Models", ICCV 2023
(arXiv 2303.07345), §3: the edited model ε_θ* is trained so that, conditioned on the concept c, it
predicts what the *frozen* model ε_θ predicts when guided **away** from c::

    ε_θ*(x_t, c, t)  →  ε_θ(x_t, t) − η · [ε_θ(x_t, c, t) − ε_θ(x_t, t)]        (MSE)

with x_t taken from partial sampling of the frozen model conditioned on c. Variants (the paper's):
**ESD-x** adapts the cross-attention layers only (``attn2``: erases the concept where the prompt names
it, leaves the rest of the model alone); **ESD-u** adapts everything *but* cross-attention (self-
attention, feed-forward, projections, ResNet convolutions: a more global erasure).

Here the edit is a LoRA (Hu et al. 2021) instead of a full fine-tune, so an erasure is a normal adapter:
saved in the diffusers format with metadata naming the concept and variant, loaded with ``--lora``,
stackable with theme adapters, removable, and combinable with SLD at inference.

**Anchors** (``anchors``, ``anchor_weight`` λ): an ESD-x/kv edit of the cross-attention keys and values
answers to every text state that resembles the concept's — other concepts, and the text states a theme
adapter stacked on top produces, included. The anchor term adds λ·Σ_l E_h‖ΔW_l h‖² over the frozen text
encoder's token states h of a general prompt set (COCO captions; the toy model's own captions), i.e.
the preservation term of closed-form concept editing (TIME / UCE) for the LoRA delta
(:func:`anchor_penalty`): the edit is pushed into directions only the concept uses.

Data-free: the frozen model generates its own training inputs. Because it is frozen, its trajectories
do not depend on the training, so they are sampled once: ``trajectories`` DDIM runs of ``sample_steps``
steps (CFG ``sample_cfg``) per prompt, and every step's (x_t, t) with its two frozen predictions is a
training example (the *pool*, cached in ``OUT/cache``). Each micro-batch draws ``batch_size`` examples of
the erased concept (and as many of the ``preserve`` concepts, whose target is the frozen model's own
conditional prediction, weighted by ``preserve_weight``). Everything else — optimizer, LR schedule,
mixed precision, checkpoints and exact resume, progress, logs, validation images, the adapter files — is
the theme trainer's (:mod:`.adapter_run`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from ..sampling.conditioning import sdxl_time_ids
from .adapter_run import AdapterRun, run_training, seed_of
from .checkpoint import TrainPosition
from .config import EraseTrainConfig
from .text import TrainingText

__all__ = [
    "ESD_TARGETS",
    "EraseTrainConfig",
    "anchor_penalty",
    "anchor_second_moment",
    "esd_target",
    "train_erase",
]

#: LoRA target modules of each ESD variant, as one regular expression over the UNet's module names
ESD_TARGETS = {
    "x": r".*attn2\.(to_q|to_k|to_v|to_out\.0)",
    "kv": r".*attn2\.(to_k|to_v)",
    "u": r".*(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out"
    r"|resnets\.\d+\.(conv1|conv2))",
}
_POOL_VERSION = 1
_CHUNK = 32  # trajectories sampled together


def anchor_second_moment(text_states: torch.Tensor) -> torch.Tensor:
    """Σ = E[h hᵀ] over every token state ``h`` of ``text_states`` (``[N, tokens, d]``), float64 → float32:
    what :func:`anchor_penalty` needs of the anchor prompts."""
    flat = text_states.reshape(-1, text_states.shape[-1]).double()
    return (flat.T @ flat / len(flat)).float()


def anchor_penalty(deltas: list[torch.Tensor], sigma: torch.Tensor) -> torch.Tensor:
    """Σ_l E_h ‖ΔW_l h‖² = Σ_l tr(ΔW_l Σ ΔW_lᵀ) for the key/value LoRA deltas ``ΔW_l`` (``[out, d]``) and the
    anchors' second moment Σ: how much the edited keys/values answer to text that is not the concept.

    It is the preservation term of closed-form concept editing — Σ_j ‖W c_j − W_old c_j‖² over preserved
    embeddings c_j (TIME, Orgad et al. 2023, Eq. 3; UCE, Gandikota et al. 2024, Eq. 2) — written for a
    LoRA delta and the token states of many prompts at once, added to ESD's loss instead of solved in
    closed form."""
    zero = torch.zeros((), device=sigma.device)
    return sum((torch.einsum("oi,ij,oj->", delta, sigma, delta) for delta in deltas), zero)


def esd_target(eps_uncond: torch.Tensor, eps_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD's training target ε_θ(x_t, t) − η · [ε_θ(x_t, c, t) − ε_θ(x_t, t)] (Gandikota et al. 2023, §3),
    from the frozen model's unconditional and concept-conditioned predictions, in float32."""
    eps_uncond, eps_concept = eps_uncond.float(), eps_concept.float()
    return eps_uncond - eta * (eps_concept - eps_uncond)


class _EraseRun(AdapterRun):
    label = "erase"
    fingerprint_changed = (
        "the base model or the sampled training pool differs from that run's",
        "resume with the same --model, or start a new run in another --out folder",
    )

    def unet_targets(self) -> str:
        return ESD_TARGETS[self.config.variant]

    def describe(self) -> str:
        config = self.config
        keep = f", preserving {len(config.preserve)} concept(s)" if config.preserve else ""
        return (
            f"{super().describe()}; ESD-{config.variant} erasing {config.concept!r}, η {config.eta:g}{keep}"
        )

    # ---- the pool -------------------------------------------------------------------------------

    def _pool_key(self) -> str:
        c, config = self.components, self.config
        fields = ("concept", "preserve", "trajectories", "sample_steps", "sample_cfg", "eta", "seed")
        data = [_POOL_VERSION, c.model_hash, self.resolution, str(self.weight_dtype)]
        data += [getattr(config, f) for f in fields]
        return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]

    def setup_data(self) -> None:
        config, acc = self.config, self.accelerator
        self.prompts = [config.concept, *config.preserve]
        self.text = TrainingText(self.components, acc.device, trained=False)
        hidden, pooled = self.text.encode(["", *self.prompts])
        if self.text.pooled and self.components.force_zeros_for_empty_prompt:
            hidden[0], pooled[0] = 0.0, 0.0  # SDXL base's unconditional branch, as generation uses it
        hidden = hidden.to(self.weight_dtype)
        self.uncond_embedding, self.prompt_embeddings = hidden[:1], hidden[1:]
        self.uncond_pooled = self.prompt_pooled = self.time_ids = None
        if pooled is not None:
            self.uncond_pooled, self.prompt_pooled = pooled[:1], pooled[1:]
            self.time_ids = torch.tensor(
                [sdxl_time_ids((self.resolution, self.resolution))], device=acc.device
            )
        cache_file = self.out_dir / "cache" / "esd-pool.safetensors"
        if self.is_main:
            self.pool = self._load_or_build_pool(cache_file)
        acc.wait_for_everyone()
        if not self.is_main:
            self.pool = self._load_or_build_pool(cache_file)
        self.erase_indices = torch.nonzero(self.pool["prompt"] == 0)[:, 0]
        self.preserve_indices = torch.nonzero(self.pool["prompt"] > 0)[:, 0]
        self.say(
            f"ESD pool: {len(self.erase_indices)} examples of {config.concept!r}"
            + (f", {len(self.preserve_indices)} to preserve" if config.preserve else "")
        )
        self.anchor_sigma = self._anchor_sigma() if config.anchors else None

    def _anchor_sigma(self) -> torch.Tensor:
        """The second moment of the frozen text encoder's states for the anchor prompts (the concept's
        own prompts left out)."""
        from ..eval.prompts import load_prompt_set

        config = self.config
        concept = config.concept.strip().lower()
        texts = [
            p.text
            for p in load_prompt_set(config.anchors, limit=config.anchor_count, seed=config.seed).prompts
            if concept not in p.text.lower()
        ]
        if not texts:
            raise InvalidArgumentError(
                f"every anchor prompt in {config.anchors!r} names {config.concept!r}",
                "anchor with a general prompt set (coco, toy-captions)",
            )
        states = [
            self.text.encode(texts[start : start + 64])[0].float() for start in range(0, len(texts), 64)
        ]
        self.anchor_prompts = len(texts)
        self.say(f"anchors: {len(texts)} prompts of {config.anchors!r}, λ {config.anchor_weight:g}")
        return anchor_second_moment(torch.cat(states))

    def prepared(self) -> None:
        """The key/value LoRA layers the anchor term holds (cross-attention ``to_k``/``to_v``)."""
        unet = self.accelerator.unwrap_model(self.unet)
        self.anchored = [
            module
            for name, module in unet.named_modules()
            if re.search(r"attn2\.(to_k|to_v)$", name) and hasattr(module, "lora_A")
        ]

    def _anchor_term(self) -> torch.Tensor:
        deltas = [
            (m.lora_B["default"].weight @ m.lora_A["default"].weight) * m.scaling["default"]
            for m in self.anchored
        ]
        return self.config.anchor_weight * anchor_penalty(deltas, self.anchor_sigma)

    def _load_or_build_pool(self, cache_file) -> dict[str, torch.Tensor]:
        from safetensors import safe_open
        from safetensors.torch import save_file

        key = self._pool_key()
        if cache_file.is_file():
            with safe_open(str(cache_file), framework="pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        pool = self._build_pool()
        if self.is_main:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            save_file(pool, str(tmp), metadata={"key": key})
            tmp.replace(cache_file)
        return pool

    @torch.no_grad()
    def _build_pool(self) -> dict[str, torch.Tensor]:
        """Sample the frozen model's DDIM trajectories for every prompt and keep each step's input with its
        training target (ESD's for the erased concept, the frozen conditional prediction for preserved
        ones)."""
        from diffusers import DDIMScheduler

        from ..progress import progress_bar

        config = self.config
        scheduler = DDIMScheduler.from_config(self.components.scheduler.config)
        scheduler.set_timesteps(config.sample_steps, device="cpu")
        total = len(self.prompts) * config.trajectories * config.sample_steps
        parts: list[dict[str, torch.Tensor]] = []
        self.unet.disable_adapters()
        self.unet.eval()
        try:
            with progress_bar(transient=True, disable=not (config.progress and self.is_main)) as bar:
                task = bar.add_task("ESD pool (frozen model)", total=total)
                for p in range(len(self.prompts)):
                    for start in range(0, config.trajectories, _CHUNK):
                        n = min(_CHUNK, config.trajectories - start)
                        for part in self._trajectory_steps(scheduler, p, start, n):
                            parts.append(part)
                            bar.advance(task, n)
        finally:
            self.unet.enable_adapters()
            self.unet.train()
        return {key: torch.cat([part[key] for part in parts]) for key in ("x", "t", "target", "prompt")}

    def _trajectory_steps(self, scheduler, p: int, start: int, n: int):
        """``n`` DDIM trajectories of prompt ``p`` (CFG ``sample_cfg``; noise seeded by (seed, p, start)):
        yields each step's inputs and targets on the CPU."""
        config, device = self.config, self.accelerator.device
        factor = self.components.vae_scale_factor
        shape = (n, int(self.unet.config.in_channels), self.resolution // factor, self.resolution // factor)
        generator = torch.Generator().manual_seed(seed_of([config.seed, 0xE5D, p, start]))
        x = torch.randn(shape, generator=generator).to(device, self.weight_dtype) * scheduler.init_noise_sigma
        uncond = self.uncond_embedding.expand(n, -1, -1)
        text = torch.cat([uncond, self.prompt_embeddings[p : p + 1].expand(n, -1, -1)])
        pooled = None
        if self.prompt_pooled is not None:
            pooled = torch.cat(
                [self.uncond_pooled.expand(n, -1), self.prompt_pooled[p : p + 1].expand(n, -1)]
            )
        conditioning = self._unet_kwargs(text, pooled)
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            eps_u, eps_c = self.unet(model_in, t.to(device), **conditioning).sample.chunk(2)
            target = esd_target(eps_u, eps_c, config.eta) if p == 0 else eps_c.float()
            yield {
                "x": x.float().cpu(),
                "t": t.repeat(n).long(),
                "target": target.cpu(),
                "prompt": torch.full((n,), p, dtype=torch.long),
            }
            eps = eps_u + config.sample_cfg * (eps_c - eps_u)
            x = scheduler.step(eps, t, x, return_dict=False)[0]

    def _unet_kwargs(self, text: torch.Tensor, pooled: torch.Tensor | None) -> dict:
        """The UNet's text conditioning for a batch (SDXL: pooled embeddings and the time ids too)."""
        time_ids = None if self.time_ids is None else self.time_ids.expand(text.shape[0], -1)
        return self.text.unet_kwargs(text, pooled, time_ids, self.weight_dtype)

    def fingerprint(self) -> str:
        return self._pool_key()

    # ---- training -------------------------------------------------------------------------------

    def next_batch(self, position: TrainPosition) -> None:
        return None  # every draw comes from the micro-batch's generator

    def _draw(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        picks = torch.randint(0, len(indices), (self.config.batch_size,), generator=generator)
        return indices[picks]

    def micro_step(self, batch: None, generator: torch.Generator, scale: float, sync: bool) -> torch.Tensor:
        """ESD's MSE on ``batch_size`` pool examples of the concept (+ the preservation term)."""
        config, acc = self.config, self.accelerator
        rows = self._draw(self.erase_indices, generator)
        if config.preserve:
            rows = torch.cat([rows, self._draw(self.preserve_indices, generator)])
        pool = self.pool
        x = pool["x"][rows].to(acc.device, self.weight_dtype)
        t = pool["t"][rows].to(acc.device)
        target = pool["target"][rows].to(acc.device)
        prompts = pool["prompt"][rows].to(acc.device)
        text = self.prompt_embeddings[prompts]
        pooled = self.prompt_pooled[prompts] if self.prompt_pooled is not None else None
        with contextlib.ExitStack() as stack:
            if not sync:
                stack.enter_context(acc.no_sync(self.unet))
            pred = self.unet(x, t, **self._unet_kwargs(text, pooled)).sample.float()
            per_example = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
            n = config.batch_size
            loss = per_example[:n].mean()
            if config.preserve:
                loss = loss + config.preserve_weight * per_example[n:].mean()
            if self.anchor_sigma is not None:
                loss = loss + self._anchor_term()
            acc.backward(loss * scale)
        return loss.detach()

    # ---- files ----------------------------------------------------------------------------------

    def extra_metadata(self) -> dict[str, Any]:
        config = self.config
        return {
            "erasure": {
                "method": "ESD (Gandikota et al. 2023) as a LoRA",
                "concept": config.concept,
                "variant": f"ESD-{config.variant}",
                "eta": config.eta,
                "preserve": list(config.preserve),
                "preserve_weight": config.preserve_weight,
                "pool_examples": len(self.pool["t"]),
                "anchors": (
                    {
                        "prompts": config.anchors,
                        "count": self.anchor_prompts,
                        "weight": config.anchor_weight,
                    }
                    if config.anchors
                    else None
                ),
            }
        }

    def summary_extra(self) -> dict[str, Any]:
        return {"erasure": self.extra_metadata()["erasure"]}


def train_erase(
    config: EraseTrainConfig,
    log=print,
    *,
    keep_components: bool = False,
    components=None,
    on_step=None,
) -> dict[str, Any]:
    """Train an erasure adapter (ESD objective as a LoRA) as ``config`` says and write it to
    ``config.out_dir``; returns a summary like :func:`safelatent.train.lora.train_lora`'s (with
    ``summary["erasure"]``). See the module docstring for the method."""
    if not isinstance(config, EraseTrainConfig):
        raise InvalidArgumentError(
            "train_erase needs an EraseTrainConfig", "build one with the concept to erase"
        )
    return run_training(
        _EraseRun(config, log), components=components, keep_components=keep_components, on_step=on_step
    )

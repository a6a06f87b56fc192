"""The ``safelatent`` command line: a thin shell over :mod:`safelatent.api`.

User errors (:class:`~safelatent.errors.SafelatentError`) print one line and exit with status 2; no
traceback (``SAFELATENT_DEBUG=1`` shows it). Usage errors (bad option values) are typer's, status 2.
"""

from __future__ import annotations

import json
import warnings
from contextlib import nullcontext
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .audit_cli import register as register_audit
from .cli_errors import err, user_errors
from .errors import InvalidArgumentError
from .eval_cli import register as register_eval
from .provenance_cli import register as register_provenance
from .sampling.schedulers import SCHEDULERS
from .sampling.sld_presets import SLD_CHOICES
from .serve_cli import register as register_serve
from .train_cli import train_app

app = typer.Typer(
    name="safelatent",
    help="Stable Diffusion with safety guidance (SLD), adapters and measurement — fully offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SLDChoice = Enum("SLDChoice", {name.replace("-", "_"): name for name in SLD_CHOICES}, type=str)
SchedulerChoice = Enum(
    "SchedulerChoice", {n.replace("-", "_").replace("+", "p"): n for n in SCHEDULERS}, type=str
)


class DeviceChoice(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DtypeChoice(StrEnum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


def _parse_warmup(text: str | None) -> int | float | None:
    """``10`` → 10 steps; ``0.2`` → 20 % of the steps."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise InvalidArgumentError(
            f"--sld-warmup {text!r} is neither a step count nor a fraction", "e.g. --sld-warmup 10 or 0.2"
        ) from None
    if not 0.0 <= value <= 1.0:
        raise InvalidArgumentError(f"--sld-warmup fraction {value} is outside [0, 1]")
    return value


def _parse_overrides(values: list[str] | None) -> dict[str, str] | None:
    """``["violence=block", ...]`` → ``{"violence": "block"}``."""
    if not values:
        return None
    overrides = {}
    for value in values:
        category, sep, action = value.partition("=")
        if not sep or not category.strip() or not action.strip():
            raise InvalidArgumentError(
                f"--policy-override {value!r} is not CATEGORY=ACTION", "e.g. --policy-override violence=block"
            )
        overrides[category.strip()] = action.strip()
    return overrides


def _policy_suppressions(result) -> list[str]:
    """One line per prompt the policy suppressed (SLD turned on for it), with the categories and words."""
    lines = []
    for decision in (result.settings.policy or {}).get("decisions", []):
        if decision["action"] == "suppress":
            reasons = "; ".join(r for rs in decision["reasons"].values() for r in rs)
            lines.append(f"SLD {decision['sld_preset']} on ({reasons})")
    return lines


def _layer_report(result) -> list[str]:
    """What the output layers did: one line per blurred or withheld image, the watermark, C2PA, audit."""
    lines = []
    for item in result.safety:
        if item.action != "keep":
            lines.append(f"[yellow]image {item.index}:[/] {'; '.join(item.reasons)}")
    marks = [item.watermark for item in result.safety if item.action != "withhold"]
    embedded = [m.content_id for m in marks if m.embedded]
    if embedded:
        lines.append(
            f"watermark: embedded in {len(embedded)} of {len(marks)} image(s), ids {', '.join(embedded)}"
        )
    elif marks:
        lines.append(f"watermark: none — {marks[0].reason}")
    if result.c2pa_status:
        lines.append(f"C2PA: {result.c2pa_status}")
    if result.audit_row is not None:
        lines.append(f"audit: row {result.audit_row}, request {result.request_id}")
    return lines


def _dtype(choice: DtypeChoice):
    import torch

    return {
        DtypeChoice.auto: None,
        DtypeChoice.fp32: torch.float32,
        DtypeChoice.fp16: torch.float16,
        DtypeChoice.bf16: torch.bfloat16,
    }[choice]


class PredictionChoice(StrEnum):
    epsilon = "epsilon"
    v_prediction = "v_prediction"
    sample = "sample"


@app.command()
@user_errors
def generate(
    prompt: Annotated[str, typer.Argument(help="What to generate.")],
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "-m",
            help="Local diffusers folder or .safetensors/.ckpt file (never downloaded; default: toy model).",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Diffusers-layout config folder for a single-file checkpoint whose shapes differ from the"
            " shipped SD 1.x / 2.x / XL configs.",
        ),
    ] = None,
    prediction_type: Annotated[
        PredictionChoice | None,
        typer.Option(
            help="What the model predicts, overriding its scheduler config. An SD 2.x single file is read as"
            " the 768-px v-prediction model unless this says epsilon (the 512-px base model).",
        ),
    ] = None,
    vae: Annotated[
        Path | None,
        typer.Option(help="Replace the VAE with a diffusers VAE folder (e.g. an fp16-safe SDXL VAE)."),
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora",
            metavar="PATH[:WEIGHT]",
            help="LoRA adapter file (diffusers/peft, kohya or safelatent .safetensors) with an optional"
            " weight (default 1.0); repeat to stack several.",
        ),
    ] = None,
    fuse_lora: Annotated[
        bool, typer.Option("--fuse-lora", help="Merge the LoRAs into the model weights (faster sampling).")
    ] = False,
    sld: Annotated[
        SLDChoice, typer.Option(help="Safe Latent Diffusion preset (paper values; weak-diffusers: s_S=20).")
    ] = SLDChoice.off,
    concept: Annotated[
        str | None,
        typer.Option(help="Safety concept SLD steers away from (default: the SLD paper's concept list)."),
    ] = None,
    sld_warmup: Annotated[
        str | None,
        typer.Option(help="Override the preset's warm-up: steps (10) or a fraction of the steps (0.2)."),
    ] = None,
    negative: Annotated[
        str | None, typer.Option(help="Negative prompt (replaces the empty CFG prompt).")
    ] = None,
    cfg: Annotated[float, typer.Option(help="Classifier-free guidance scale; ≤ 1 disables CFG.")] = 7.5,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 50,
    scheduler: Annotated[
        SchedulerChoice | None, typer.Option(help="Sampler (default: the model's own scheduler).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seeds one CPU torch.Generator for the whole call (random if omitted).")
    ] = None,
    n: Annotated[int, typer.Option("-n", "--num-images", help="Images per prompt.")] = 1,
    width: Annotated[int | None, typer.Option(help="Width, multiple of 8 (default: model's).")] = None,
    height: Annotated[int | None, typer.Option(help="Height, multiple of 8 (default: model's).")] = None,
    out: Annotated[Path, typer.Option(help="Output folder for PNGs and JSON sidecars.")] = Path("outputs"),
    device: Annotated[DeviceChoice, typer.Option(help="Where to run.")] = DeviceChoice.auto,
    dtype: Annotated[DtypeChoice, typer.Option(help="Weights dtype (auto: fp16 on CUDA, fp32 on CPU).")] = (
        DtypeChoice.auto
    ),
    compile_unet: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the UNet with CUDA graphs (default: on for CUDA, off on CPU). The first call"
            " per image size compiles (about a minute for SD 1.5 on an H100).",
            show_default=False,
        ),
    ] = None,
    policy: Annotated[
        str,
        typer.Option(
            help="Policy (prompt rules, output classifiers, provenance, audit): a TOML file, or default |"
            " artist | evaluation | toy. Hard blocks apply under all."
        ),
    ] = "default",
    policy_override: Annotated[
        list[str] | None,
        typer.Option(
            "--policy-override",
            metavar="CATEGORY=ACTION",
            help="Per-request category action (allow, suppress, block); repeat."
            " Hard blocks cannot be relaxed.",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Generate images from PROMPT with a local Stable Diffusion model, optionally with LoRAs and SLD.

    Writes NNNNN-SEED.png (A1111-style `parameters` text chunk) and NNNNN-SEED.json per image. With SLD,
    the safety concept is encoded by the LoRA-adapted text encoder, like the prompt.
    """
    from . import api
    from .sampling.sld_presets import get_sld_preset

    warmup = _parse_warmup(sld_warmup)
    sld_config = get_sld_preset(sld.value)
    if warmup is not None:
        if sld_config is None:
            raise InvalidArgumentError("--sld-warmup needs an SLD preset", "add e.g. --sld medium")
        sld_config = sld_config.with_warmup(warmup)
    resolved_device = None if device is DeviceChoice.auto else device.value
    if resolved_device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InvalidArgumentError("--device cuda but no CUDA GPU is visible", "use --device cpu")
    if fuse_lora and not lora:
        raise InvalidArgumentError("--fuse-lora needs at least one --lora", "add --lora PATH[:WEIGHT]")
    overrides = _parse_overrides(policy_override)
    with err.status("loading model…", spinner="dots") if not quiet else nullcontext():
        pipe = api.load(
            model,
            device=resolved_device,
            dtype=_dtype(dtype),
            config_dir=config,
            compile=compile_unet,
            policy=policy,
            prediction_type=prediction_type.value if prediction_type else None,
            vae=vae,
        )
        if lora:
            pipe.set_loras(lora, fuse=fuse_lora)
    for active in pipe.loras:
        words = f" · trigger words: {', '.join(active.trigger_words)}" if active.trigger_words else ""
        err.print(
            f"LoRA {active.name} ×{active.weight:g} ({active.format}, {active.hash}){words}", highlight=False
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation warnings are reported below, once
        result = pipe.generate(
            prompt,
            negative_prompt=negative,
            num_images_per_prompt=n,
            num_inference_steps=steps,
            guidance_scale=cfg,
            scheduler=None if scheduler is None else scheduler.value,
            sld=sld_config,
            safety_concept=concept,
            seed=seed,
            width=width,
            height=height,
            progress=not quiet,
            policy_overrides=overrides,
        )
    for decision in _policy_suppressions(result):
        err.print(f"[yellow]policy:[/] {decision}", highlight=False)
    for message in result.warnings:
        err.print(f"[yellow]warning:[/] {message}", highlight=False)
    paths = result.save(out)
    for line in _layer_report(result):
        err.print(line, highlight=False)
    s = result.settings
    sld_text = f"SLD {s.sld['sld_preset']}" if s.sld else "SLD off"
    if result.compile_seconds:
        err.print(f"compiled the UNet for this shape in {result.compile_seconds:.1f} s", highlight=False)
    err.print(
        f"{len(paths)} image(s) in {result.seconds:.1f} s · seed {s.seed} · {sld_text} · {s.sampler}",
        highlight=False,
    )
    for path in paths:
        typer.echo(str(path))


toy_app = typer.Typer(help="The toy world and toy model: train, measure, demo.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")
app.add_typer(train_app, name="train")
register_provenance(app)
register_audit(app)
register_eval(app)
register_serve(app)


@toy_app.command("train")
@user_errors
def toy_train(
    out: Annotated[Path, typer.Option(help="Where to write the diffusers-layout model folder.")] = Path(
        "toy-model"
    ),
    seed: Annotated[int, typer.Option(help="Seed of data, initialisation and order.")] = 0,
    images: Annotated[int, typer.Option(help="Training images to render (cached).")] = 40_000,
    vae_steps: Annotated[int, typer.Option(help="Autoencoder steps.")] = 6000,
    unet_steps: Annotated[int, typer.Option(help="UNet + text-encoder steps.")] = 6500,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    cache_dir: Annotated[Path | None, typer.Option(help="Rendered-data cache folder.")] = None,
) -> None:
    """Train the toy model from scratch (seeded, reproducible): autoencoder, then UNet + text encoder."""
    from .toy.train import ToyTrainConfig, train_toy_model

    config = ToyTrainConfig(
        seed=seed, n_images=images, vae_steps=vae_steps, unet_steps=unet_steps, device=device
    )
    if cache_dir is not None:
        config.cache_dir = str(cache_dir)
    summary = train_toy_model(config, out, log=lambda m: err.print(m, highlight=False))
    typer.echo(json.dumps(summary["timings_s"]))


@toy_app.command("eval")
@user_errors
def toy_eval(
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="Toy model folder (default: shipped).")
    ] = None,
    samples: Annotated[int, typer.Option(help="Prompts per condition.")] = 200,
    steps: Annotated[int, typer.Option(help="DDIM steps.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of prompts and noise.")] = 0,
    out: Annotated[Path, typer.Option(help="Folder for toy_quality.json / .md.")] = Path("toy-quality"),
) -> None:
    """Measure prompt fidelity, marker and theme rates, and SLD's effect, with the world's classifiers."""
    from . import api
    from .toy.evaluate import ToyQualityConfig, evaluate_toy_quality, write_report

    pipe = api.load(model, device="cpu" if model is None else None)
    config = ToyQualityConfig(samples=samples, steps=steps, seed=seed)

    def show(r):
        err.print(
            f"{r.prompts:6s} SLD {r.sld:8s} shape+colour {r.shape_colour:6.1%} background {r.background:6.1%}"
            f" marker {r.marker:6.1%} theme {r.theme:6.1%}",
            highlight=False,
        )

    report = evaluate_toy_quality(pipe, config, on_condition=show)
    write_report(report, out)
    typer.echo(report.markdown())


@toy_app.command("demo")
@user_errors
def toy_demo(
    out: Annotated[Path, typer.Option(help="Folder for grid.png, index.html, summary.json.")] = Path(
        "demo-out"
    ),
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="Toy model folder (default: shipped).")
    ] = None,
    seeds: Annotated[int, typer.Option(help="Images per prompt.")] = 4,
) -> None:
    """Baseline vs SLD on the toy model: a labelled grid and an HTML page."""
    from . import api
    from .toy.demo import run_demo

    pipe = api.load(model, device="cpu" if model is None else None)
    result = run_demo(pipe, out, seeds=seeds)
    for setting, rates in result.summary.items():
        if setting == "layers":
            err.print(
                f"security layers (policy toy): {rates['blurred']} of {rates['images']} images blurred"
                f" by the toy classifier after SLD {rates['sld']}; audit row {rates['audit_row']}",
                highlight=False,
            )
            continue
        err.print(
            f"SLD {setting:7s} marker rate: {rates['marker_rate_on_marker_prompts']:.0%} on prompts"
            f" asking for it, {rates['marker_rate_on_plain_prompts']:.0%} on prompts without it",
            highlight=False,
        )
    typer.echo(str(result.page))


@app.command()
def version() -> None:
    """Print the safelatent version."""
    typer.echo(__version__)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()

"""``safelatent eval`` (run a measurement, then write its report) and ``safelatent report`` (rebuild the
report of a run folder, all shards merged): thin shells over :mod:`safelatent.eval`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .cli_errors import err, user_errors
from .errors import InvalidArgumentError


def _configs_from_flags(sld: str, loras: list[str], concept: str | None):
    from .eval.configs import EvalConfig

    configs = []
    for preset in (p.strip() for p in sld.split(",")):
        if not preset:
            continue
        prefix = "lora-" if loras else ""
        name = f"{prefix}baseline" if preset == "off" else f"{prefix}sld-{preset}"
        configs.append(
            EvalConfig(
                name=name, sld=preset, concept=concept if preset != "off" else None, loras=tuple(loras)
            )
        )
    return configs


def _print_table(summary: dict) -> None:
    """The overall row of every configuration (and the toy columns), on stderr."""
    from .eval.report import fid_text

    for name, data in summary["configs"].items():
        overall = next((r for r in data["categories"] if r["category"] == "overall"), None)
        line = f"{name:22s} {data['images']:6d} images"
        if overall:
            line += (
                f"  P(inappropriate) {overall['probability']:6.1%}"
                f" [{overall['ci_low']:.1%}, {overall['ci_high']:.1%}]"
            )
            if overall["exp_max_mean"] is not None:
                line += f"  exp. max {overall['exp_max_mean']:6.1%} ± {overall['exp_max_std']:.1%}"
        if data["quality"]:
            line += "".join(f"  {key} {value:.3f}" for key, value in data["quality"].items())
        if data.get("fid"):
            line += f"  FID {fid_text(data['fid'])}"
        toy = data["toy"]
        if toy:
            fidelity = toy.get("fidelity_shape_colour")
            line += f"  fidelity {fidelity:6.1%}" if fidelity is not None else ""
            line += f"  theme {toy['theme']:6.1%}  marker {toy['marker']:6.1%}"
        err.print(line, highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``eval`` and ``report`` to the main app."""

    @app.command("eval")
    @user_errors
    def eval_command(
        prompts: Annotated[
            str,
            typer.Option(
                help="Prompt set: i2p | coco | toy-marker | toy-plain | toy-theme | toy-theme-marker | "
                "toy-captions | a CSV file."
            ),
        ] = "i2p",
        categories: Annotated[
            str | None,
            typer.Option(help="I2P categories to keep, comma separated (a prompt with any of them)."),
        ] = None,
        hard: Annotated[
            bool | None, typer.Option("--hard/--not-hard", help="Only I2P 'hard' prompts / only the others.")
        ] = None,
        limit: Annotated[int | None, typer.Option(help="First N prompts after filtering.")] = None,
        prompt_column: Annotated[str | None, typer.Option(help="Prompt column of a CSV file.")] = None,
        model: Annotated[
            Path | None, typer.Option("--model", "-m", help="Local SD folder or file (default: toy model).")
        ] = None,
        prediction_type: Annotated[
            str | None,
            typer.Option(
                help="epsilon | v_prediction | sample: overrides the model's (an SD 2.x 512 single file needs"
                " epsilon)."
            ),
        ] = None,
        vae: Annotated[
            Path | None, typer.Option(help="Replace the VAE with a diffusers VAE folder (fp16-safe SDXL).")
        ] = None,
        sld: Annotated[
            str, typer.Option(help="Configurations: SLD presets, comma separated (off = baseline).")
        ] = "off",
        lora: Annotated[
            list[str] | None,
            typer.Option("--lora", metavar="PATH[:WEIGHT]", help="Adapter for every configuration."),
        ] = None,
        concept: Annotated[
            str | None, typer.Option(help="SLD safety concept (default: the paper's).")
        ] = None,
        matrix: Annotated[
            Path | None,
            typer.Option(help="TOML file with [run] settings and [configs.NAME] tables (see docs)."),
        ] = None,
        images_per_prompt: Annotated[int, typer.Option(help="Images per prompt (I2P: 10).")] = 10,
        batch: Annotated[
            int, typer.Option(help="Images per call from the prompt's one generator (I2P: 5).")
        ] = 5,
        steps: Annotated[int, typer.Option(help="Denoising steps (I2P: 50).")] = 50,
        size: Annotated[int | None, typer.Option(help="Image side in pixels (default: the model's).")] = None,
        cfg: Annotated[
            float | None, typer.Option(help="CFG scale for prompts without their own (default: the model's).")
        ] = None,
        override_cfg: Annotated[
            bool, typer.Option(help="Use --cfg for every prompt, ignoring their own.")
        ] = False,
        classifier: Annotated[
            list[str] | None,
            typer.Option(help="toy | nudenet | q16 (repeat; default: toy for toy sets, else q16 + nudenet)."),
        ] = None,
        q16_clip: Annotated[Path | None, typer.Option(help="Local CLIP ViT-L/14 folder for Q16.")] = None,
        clip: Annotated[
            Path | None, typer.Option(help="Full local CLIP folder: CLIP score of every image vs its prompt.")
        ] = None,
        reference_images: Annotated[
            Path | None, typer.Option(help="With --clip: reference image folder for the domain score.")
        ] = None,
        inception: Annotated[
            Path | None,
            typer.Option(
                help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth or its .safetensors "
                "conversion): store every image's features, report FID per configuration."
            ),
        ] = None,
        fid_reference: Annotated[
            Path | None,
            typer.Option(
                metavar="DIR|STATS.npz",
                help="With --inception: real images to compare with, a folder or statistics from "
                "`python -m safelatent.eval.fid stats` (may also be given to `safelatent report` later).",
            ),
        ] = None,
        fid_preprocessing: Annotated[
            str,
            typer.Option(
                metavar="NAME",
                help="FID resize and scaling: torchmetrics | torch-fidelity | pytorch-fid (the reference "
                "statistics must use the same).",
            ),
        ] = "torchmetrics",
        save_images: Annotated[
            bool, typer.Option(help="Keep every image (the report shows a sample grid).")
        ] = False,
        out: Annotated[
            Path, typer.Option(help="Run folder (results, report); an existing run resumes.")
        ] = Path("eval-run"),
        shard: Annotated[
            str | None, typer.Option(help="This process's share, e.g. 1/3 (see the docs).")
        ] = None,
        device: Annotated[
            str | None, typer.Option(help="cpu or cuda (default: cuda when available).")
        ] = None,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    ) -> None:
        """Measure inappropriate generation (the I2P protocol) and quality for one or more configurations;
        resumable (re-run the same command) and shardable (--shard i/n, or torchrun / accelerate launch)."""
        from .eval.configs import EvalSettings, load_matrix
        from .eval.report import build_report
        from .eval.run import run_eval
        from .eval.store import Shard, parse_shard

        if matrix is not None:
            settings = load_matrix(matrix)
        else:
            settings = EvalSettings(
                prompts=prompts,
                categories=tuple(c.strip() for c in (categories or "").split(",") if c.strip()),
                hard=hard,
                limit=limit,
                prompt_column=prompt_column,
                model=str(model) if model else None,
                prediction_type=prediction_type,
                vae=str(vae) if vae else None,
                images_per_prompt=images_per_prompt,
                batch=batch,
                steps=steps,
                size=size,
                guidance_scale=cfg,
                override_guidance=override_cfg,
                classifiers=tuple(classifier or ()),
                q16_clip=str(q16_clip) if q16_clip else None,
                clip=str(clip) if clip else None,
                reference_images=str(reference_images) if reference_images else None,
                inception=str(inception) if inception else None,
                fid_reference=str(fid_reference) if fid_reference else None,
                fid_preprocessing=fid_preprocessing,
                save_images=save_images,
                configs=tuple(_configs_from_flags(sld, list(lora or []), concept)),
            )
        chosen = parse_shard(shard) if shard else Shard.from_env()
        if chosen is not None and chosen.count > 1:
            err.print(f"shard {chosen}", highlight=False)
        summary = run_eval(settings, out, shard=chosen, device=device, progress=not quiet)
        err.print(
            f"{summary.generated} images generated, {summary.skipped} already stored, "
            f"{summary.blocked_prompts} prompt(s) blocked by a hard block, {summary.seconds:.1f} s",
            highlight=False,
        )
        if chosen is not None and chosen.count > 1:
            err.print(
                "other shards may still run: build the report with `safelatent report RUN`", highlight=False
            )
            return
        page = build_report(out, device=device)
        _print_table(json.loads(page.with_name("results.json").read_text(encoding="utf-8")))
        typer.echo(str(page))

    @app.command("report")
    @user_errors
    def report_command(
        run: Annotated[Path, typer.Argument(help="A run folder written by `safelatent eval`.")],
        fid_reference: Annotated[
            Path | None,
            typer.Option(
                metavar="DIR|STATS.npz",
                help="FID against these real images instead of the run's reference (runs with --inception).",
            ),
        ] = None,
        device: Annotated[
            str | None,
            typer.Option(
                help="For a reference folder's FID features: cpu or cuda (default: cuda if available)."
            ),
        ] = None,
    ) -> None:
        """Rebuild the report of a run (all shards merged): report/index.html, results.json, CSVs."""
        from .eval.report import build_report

        if not (run / "run.json").is_file():
            raise InvalidArgumentError(
                f"{run} is not an evaluation run folder (no run.json)", "pass --out of eval"
            )
        if fid_reference is not None:
            protocol = json.loads((run / "run.json").read_text(encoding="utf-8"))["protocol"]
            if not protocol.get("inception"):
                raise InvalidArgumentError(
                    f"{run} stored no FID features (it ran without --inception)",
                    "run `safelatent eval` again with --inception into a new --out folder",
                )
        page = build_report(run, fid_reference=fid_reference, device=device)
        _print_table(json.loads(page.with_name("results.json").read_text(encoding="utf-8")))
        typer.echo(str(page))

"""``safelatent verify IMAGE`` and ``safelatent keys init``: provenance on the command line.

:data:`provenance_app` holds both commands (for tests and stand-alone use); :func:`register` adds them
to the main ``safelatent`` app. User errors print one line and exit with status 2 (``SAFELATENT_DEBUG=1``
shows the traceback); ``verify`` exits with status 1 when the image carries a C2PA manifest that fails
validation (tampered or badly signed), 0 otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .cli_errors import err, user_errors
from .safety.keys import ProvenanceError, init_keys

provenance_app = typer.Typer(
    help="Provenance: invisible watermark and C2PA content credentials — fully offline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(
    help="Keys: C2PA signing keys (init) and the service's API keys (add, list, revoke).",
    no_args_is_help=True,
)
provenance_app.add_typer(keys_app, name="keys")


def _open_image(path: Path):
    """Open ``path`` as an image; returns ``(image, decode_error)``. A file PIL cannot identify is a user
    error; one it identifies but cannot decode (truncated, tampered) still gets its C2PA manifest read."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise ProvenanceError(f"image not found: {path}", "check the path")
    if path.is_dir():
        raise ProvenanceError(f"{path} is a folder, not an image", "pass one image file")
    try:
        image = Image.open(path)
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise ProvenanceError(
            f"cannot read {path} as an image: {error}", "verify reads PNG, JPEG and WebP files"
        ) from None
    except OSError as error:
        raise ProvenanceError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        return image, str(error)
    return image, None


@provenance_app.command("verify")
@user_errors
def verify(
    image: Annotated[Path, typer.Argument(help="Image to check (PNG, JPEG, WebP).", show_default=False)],
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of text.")
    ] = False,
    keys_dir: Annotated[
        Path | None,
        typer.Option(
            "--keys-dir",
            help="Key folder whose root-ca.pem is a trust anchor (default: $SAFELATENT_KEYS_DIR or"
            " ~/.config/safelatent/keys).",
        ),
    ] = None,
    trust: Annotated[
        Path | None, typer.Option("--trust", help="Extra trust anchors: a PEM file of root certificates.")
    ] = None,
) -> None:
    """Report the invisible watermark (bits found or "not found") and the C2PA manifest (trusted,
    untrusted, invalid or absent) of IMAGE. Exit status 1 if a manifest is present but invalid."""
    from .safety import c2pa_manifest, watermark

    loaded, decode_error = _open_image(image)
    anchors = None
    if trust is not None:
        try:
            anchors = trust.read_bytes()
        except OSError as error:
            raise ProvenanceError(f"cannot read --trust {trust}: {error.strerror}") from None
    if decode_error is None:
        mark = watermark.verify(loaded)
    else:
        mark = watermark.WatermarkReport(
            checked=False, found=False, reason=f"pixels cannot be decoded: {decode_error}"
        )
    manifest = c2pa_manifest.read_manifest(image, trust_anchors=anchors, keys_dir=keys_dir)
    if json_output:
        report = {
            "image": str(image),
            "format": loaded.format,
            "width": loaded.width,
            "height": loaded.height,
            "watermark": mark.to_dict(),
            "c2pa": manifest.to_dict(),
        }
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        typer.echo(f"image      {image} ({loaded.width}×{loaded.height} {loaded.format})")
        typer.echo(f"watermark  {mark.summary()}")
        typer.echo(f"C2PA       {manifest.summary()}")
        generation = manifest.generation or {}
        if generation:
            adapters = ", ".join(
                f"{a.get('name', '?')} ({a.get('hash', '?')})" for a in generation.get("adapters", []) or []
            )
            typer.echo(f"           model {generation.get('model_hash')} · adapters: {adapters or 'none'}")
    if manifest.status == "invalid":
        raise typer.Exit(1)


@keys_app.command("init")
@user_errors
def keys_init(
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="Where to write the keys (default: $SAFELATENT_KEYS_DIR or ~/.config/safelatent/keys).",
        ),
    ] = None,
    common_name: Annotated[
        str, typer.Option("--name", help="Signer name shown by C2PA readers.")
    ] = "safelatent local signer",
    force: Annotated[bool, typer.Option("--force", help="Replace existing keys.")] = False,
) -> None:
    """Create a local root CA and a C2PA signer certificate issued by it (ES256 / P-256, keys 0600)."""
    paths = init_keys(directory, common_name=common_name, force=force)
    for path in paths.all():
        typer.echo(str(path))
    err.print(
        f"trust anchor: {paths.root_cert} — give it to `safelatent verify --trust` elsewhere; keep the"
        " .key files private",
        highlight=False,
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    """Add ``verify`` and ``keys`` to the main ``safelatent`` app."""
    app.command("verify")(verify)
    app.add_typer(keys_app, name="keys")


__all__ = ["keys_app", "provenance_app", "register", "verify"]

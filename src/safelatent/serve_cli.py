"""``safelatent serve`` and ``safelatent keys add | list | revoke``: the service on the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .cli_errors import err, user_errors
from .provenance_cli import keys_app

KeysDb = Annotated[
    Path | None,
    typer.Option(
        "--keys-db",
        help="API key store (default $SAFELATENT_API_KEYS or ~/.local/share/safelatent/api-keys.sqlite3)",
    ),
]


@keys_app.command("add")
@user_errors
def keys_add(
    name: Annotated[str, typer.Argument(help="who the key is for, e.g. studio-a")],
    requests_per_minute: Annotated[
        float, typer.Option("--requests-per-minute", "--rate", help="average request rate allowed")
    ] = 30.0,
    images_per_day: Annotated[int, typer.Option("--images-per-day", help="daily image quota (UTC)")] = 1000,
    keys_db: KeysDb = None,
) -> None:
    """Create an API key for `safelatent serve`; it is printed once (only its hash is stored)."""
    from .serve.api_keys import ApiKeyStore

    store = ApiKeyStore(keys_db)
    key = store.add(name, requests_per_minute=requests_per_minute, images_per_day=images_per_day)
    err.print(
        f"API key {name!r} ({requests_per_minute:g} requests/min, {images_per_day} images/day) stored"
        f" hashed in {store.path}. It is shown only now:",
        highlight=False,
    )
    typer.echo(key)


@keys_app.command("list")
@user_errors
def keys_list(keys_db: KeysDb = None) -> None:
    """List the service's API keys (names, limits, today's images; never the keys)."""
    from .serve.api_keys import ApiKeyStore

    store = ApiKeyStore(keys_db)
    rows = store.list()
    if not rows:
        err.print(f"no API keys in {store.path}; create one with: safelatent keys add NAME", highlight=False)
        return
    for key, used in rows:
        state = f"revoked {key.revoked}" if key.revoked else "active"
        typer.echo(
            f"{key.name}\t{state}\t{key.requests_per_minute:g}/min\t{used}/{key.images_per_day} images today"
            f"\tcreated {key.created}"
        )


@keys_app.command("revoke")
@user_errors
def keys_revoke(name: Annotated[str, typer.Argument(help="the key's name")], keys_db: KeysDb = None) -> None:
    """Revoke an API key (effective at once, also in a running server)."""
    from .serve.api_keys import ApiKeyStore

    ApiKeyStore(keys_db).revoke(name)
    err.print(f"revoked API key {name!r}", highlight=False)


@user_errors
def serve(
    model: Annotated[
        str | None, typer.Option("--model", help="local model folder or file (default: the toy model)")
    ] = None,
    model_config: Annotated[
        str | None, typer.Option("--model-config", help="config folder for a single-file checkpoint")
    ] = None,
    prediction_type: Annotated[
        str | None,
        typer.Option(
            "--prediction-type",
            help="epsilon | v_prediction | sample (default: the model's; SD 2.x 512 single files: epsilon)",
        ),
    ] = None,
    vae: Annotated[
        str | None, typer.Option("--vae", help="diffusers VAE folder replacing the model's (fp16-safe SDXL)")
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option("--policy", help="policy file or shipped name (default: toy for the toy model)"),
    ] = None,
    adapter: Annotated[
        list[str] | None, typer.Option("--adapter", help="register an adapter: NAME=PATH (repeatable)")
    ] = None,
    adapters_dir: Annotated[
        Path | None, typer.Option("--adapters-dir", help="register every .safetensors in a folder")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8000,
    keys_db: KeysDb = None,
    concurrency: Annotated[int, typer.Option("--concurrency", help="worker pipelines")] = 1,
    queue: Annotated[int, typer.Option("--queue", help="jobs waiting or running at most")] = 16,
    max_steps: Annotated[int, typer.Option("--max-steps")] = 50,
    max_images: Annotated[int, typer.Option("--max-images", help="images per request")] = 4,
    max_size: Annotated[
        int | None, typer.Option("--max-size", help="largest width/height (default: the model's size)")
    ] = None,
    minimum_sld: Annotated[
        str, typer.Option("--minimum-sld", help="weakest SLD preset any request gets (off: none forced)")
    ] = "off",
    default_sld: Annotated[
        str, typer.Option("--default-sld", help="SLD preset when a request names none")
    ] = "off",
    device: Annotated[
        str | None, typer.Option("--device", help="cpu or cuda (default: cuda if available)")
    ] = None,
) -> None:
    """Serve generation over HTTP: API keys, limits, the security layers, and a web page at /."""
    import uvicorn

    from .serve.app import create_app
    from .serve.settings import ServeLimits, ServeSettings, parse_adapter_option, scan_adapter_folder

    adapters = scan_adapter_folder(adapters_dir) if adapters_dir else {}
    adapters.update(parse_adapter_option(text) for text in adapter or [])
    settings = ServeSettings(
        model=model,
        model_config=model_config,
        prediction_type=prediction_type,
        vae=vae,
        policy=policy,
        adapters=adapters,
        keys_db=keys_db,
        device=device,
        default_sld=default_sld,
        minimum_sld=minimum_sld,
        limits=ServeLimits(
            max_steps=max_steps,
            max_images=max_images,
            max_size=max_size,
            queue=queue,
            concurrency=concurrency,
        ),
    )
    app = create_app(settings)
    service = app.state.service
    if service.keys.empty:
        err.print(
            f"[yellow]no API keys in {service.keys.path}[/]: every request will get 401 until you create one"
            " with: safelatent keys add NAME",
            highlight=False,
        )
    err.print(
        f"serving {service.model_name} (policy {service.policy.name!r}, {len(adapters)} adapter(s),"
        f" {concurrency} worker(s)) on http://{host}:{port}/",
        highlight=False,
    )
    uvicorn.run(app, host=host, port=port, log_level="info")


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the main app (``keys add|list|revoke`` live in the ``keys`` group)."""
    app.command("serve")(serve)


__all__ = ["register", "serve"]

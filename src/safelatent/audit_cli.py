"""``safelatent audit`` (list requests from the audit log) and ``safelatent audit verify`` (check its
hash chain).

:data:`audit_app` holds both (for tests and stand-alone use); :func:`register` adds it to the main
``safelatent`` app as ``audit``. The database is ``--db PATH``, else ``$SAFELATENT_AUDIT_DB``, else
``~/.local/share/safelatent/audit.sqlite3``; it is never created by these commands. User errors (a missing
file, one that is not an audit log, a bad date) print one line and exit with status 2 (``SAFELATENT_DEBUG=1``
shows the traceback); ``audit verify`` exits with status 1 when the chain is broken.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .cli_errors import err, user_errors
from .safety.audit import OUTCOMES, AuditLog, AuditRecord, default_audit_db

audit_app = typer.Typer(
    help="The audit log: one row per generation request (prompt or its hash, decisions, image pHashes).",
    invoke_without_command=True,
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)

OutcomeChoice = Enum("OutcomeChoice", {o.replace("-", "_"): o for o in OUTCOMES}, type=str)

_DB_HELP = "Audit database (default: $SAFELATENT_AUDIT_DB or ~/.local/share/safelatent/audit.sqlite3)."


def _open(db: Path | None) -> AuditLog:
    return AuditLog(db if db is not None else default_audit_db(), create=False)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(records: list[AuditRecord]) -> Table:
    table = Table(show_lines=False, header_style="bold")
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("request id", no_wrap=True)
    table.add_column("outcome", no_wrap=True)
    table.add_column("prompt or hash", overflow="fold")
    table.add_column("reasons", overflow="fold")
    colour = {"generated": "green", "blocked": "red", "error": "red"}
    for record in records:
        shown = record.prompt if record.prompt is not None else f"sha256:{record.prompt_sha256[:16]}…"
        style = colour.get(record.outcome, "yellow")
        table.add_row(
            record.time[:19].replace("T", " "),
            _shorten(record.request_id, 36),
            f"[{style}]{record.outcome}[/]",
            _shorten(shown, 120),
            "\n".join(record.reasons) or "—",
        )
    return table


@audit_app.callback()
@user_errors
def audit(
    ctx: typer.Context,
    db: Annotated[Path | None, typer.Option("--db", help=_DB_HELP, show_default=False)] = None,
    since: Annotated[
        str | None,
        typer.Option(metavar="ISO", help="Only requests at or after this ISO date/time (no zone = UTC)."),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(metavar="ISO", help="Only requests before this ISO date/time (no zone = UTC)."),
    ] = None,
    outcome: Annotated[OutcomeChoice | None, typer.Option(help="Only requests with this outcome.")] = None,
    grep: Annotated[
        str | None,
        typer.Option(
            metavar="TEXT",
            help="Only requests whose prompt, normalised prompt, id or reasons contain TEXT (any case); for"
            " hash-only rows, whose prompt is exactly TEXT.",
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option(min=0, metavar="N", help="At most this many requests, newest first.")
    ] = 100,
    json_output: Annotated[
        bool, typer.Option("--json", help="One JSON object per line (every column) instead of a table.")
    ] = False,
) -> None:
    """List audited generation requests, newest first: time, request id, outcome, prompt (or its SHA-256
    when the policy keeps no prompts) and reasons. `safelatent audit verify` checks the hash chain."""
    ctx.obj = {"db": db}
    if ctx.invoked_subcommand is not None:
        return
    with _open(db) as log:
        records = log.query(
            since=since,
            until=until,
            outcome=None if outcome is None else outcome.value,
            contains=grep,
            limit=limit,
        )
    if json_output:
        for record in records:
            typer.echo(json.dumps(record.to_dict(), ensure_ascii=False, sort_keys=True))
        return
    if not records:
        err.print(f"no audited requests match in {log.path}", highlight=False)
        return
    Console(soft_wrap=False).print(_table(records))


@audit_app.command("verify")
@user_errors
def verify(
    ctx: typer.Context,
    db: Annotated[Path | None, typer.Option("--db", help=_DB_HELP, show_default=False)] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of text.")
    ] = False,
) -> None:
    """Recompute the audit log's hash chain; report the first edited, inserted or deleted row. Exit status
    1 if the chain is broken."""
    if db is None and ctx.obj:
        db = ctx.obj.get("db")
    with _open(db) as log:
        report = log.verify_chain()
    if json_output:
        typer.echo(json.dumps({"db": str(log.path), **report.to_dict()}))
    else:
        typer.echo(f"{log.path}: {report.summary()}")
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``audit`` (and ``audit verify``) to the main ``safelatent`` app."""
    app.add_typer(audit_app, name="audit")


__all__ = ["audit_app", "register"]

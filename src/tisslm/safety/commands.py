"""`tisslm audit`: check the server's hash-chained audit log (`tisslm serve --audit-log FILE`).

    tisslm audit verify audit.jsonl          # exit 0 when intact, 1 naming the first bad record
    tisslm audit verify audit.jsonl --json

A missing file is a TissLMError: one line on stderr and exit status 2 (the main CLI's run_main).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tisslm.core.errors import TissLMError
from tisslm.safety.audit import verify

app = typer.Typer(no_args_is_help=True, help="Audit log: verify the hash chain of a server's audit log.")


@app.command("verify")
def verify_command(
    path: Annotated[Path, typer.Argument(help="The audit log (JSONL) that `tisslm serve --audit-log` writes.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Check every record's hash, seq and link: exit 0 when intact, 1 naming the first bad record."""
    if not path.is_file():
        raise TissLMError(f"audit log {path}: no such file")
    result = verify(path)
    if as_json:
        typer.echo(json.dumps(result.to_json()))
    else:
        typer.echo(f"{path}: {result.message}", err=not result.ok)
    if not result.ok:
        raise typer.Exit(1)

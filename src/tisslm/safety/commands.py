"""`tisslm audit`: check a hash-chained audit log (`tisslm serve --audit-log FILE`, `tisslm tiss run`);
`tisslm watermark`: test a text for the watermark `tisslm generate --watermark` puts in;
`tisslm safety scan`: what the content filter finds in a text and what its policy does.

    tisslm audit verify audit.jsonl          # exit 0 when intact, 1 naming the first bad record
    tisslm audit verify audit.jsonl --json
    tisslm watermark detect out.txt          # z-score, p-value and verdict; exit 0 either way
    tisslm generate ... | tisslm watermark detect --json -
    tisslm safety scan notes.txt             # each finding: category, line:column, kind, action
    tisslm safety scan --json -              # the verdict and its findings, and the filtered text

A missing file is a TissLMError: one line on stderr and exit status 2 (the main CLI's run_main).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from tisslm.core.errors import TissLMError

# Each command imports what it runs: `safety scan` never loads torch (the watermark's), `--help` nothing.
app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Audit log: verify the hash chain and signed head of a server's or a TissLang run's audit log.",
)
watermark_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Watermark: test whether a text came from `generate --watermark` (a z-test on its green tokens).",
)


@app.command("verify")
def verify_command(
    path: Annotated[
        Path, typer.Argument(help="An audit log (JSONL): `tisslm serve --audit-log`'s or a `tisslm tiss run`'s.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Check every record's hash, seq and link, then the signed head beside the log (FILE.head; key:
    TISSLM_AUDIT_KEY, else TISSLM_AUDIT_KEY_FILE): exit 0 when intact, 1 naming the first bad record
    or the records cut from the end."""
    from tisslm.safety.audit import verify

    if not path.is_file():
        raise TissLMError(f"audit log {path}: no such file")
    result = verify(path)
    if as_json:
        typer.echo(json.dumps(result.to_json()))
    else:
        typer.echo(f"{path}: {result.message}", err=not result.ok)
    if not result.ok:
        raise typer.Exit(1)


safety_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="Content filter: scan text as the server filters outputs."
)
ParamsOption = Annotated[
    Path | None, typer.Option("--params", help="params.yaml to read (default: ./params.yaml if present).")
]


@safety_app.command("scan")
def scan_command(
    source: Annotated[str, typer.Argument(help="Text file to scan, or - to read stdin.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    params: ParamsOption = None,
) -> None:
    """List what the filter finds (category, span, action under safety.filters.policy): exit 0 when
    the policy lets the text out unchanged or flagged, 1 when it would redact or block it."""
    from tisslm.core.config import project_params
    from tisslm.safety.filters import ContentFilter

    text = _read_text(source)
    # The filter the server and `generate` apply: the policy, and the anonymiser's settings (clean.anonymize).
    verdict = ContentFilter.from_params(project_params(params)).apply(text)
    if as_json:
        typer.echo(json.dumps(verdict.to_json()))
    else:
        for finding in verdict.findings:
            line = text.count("\n", 0, finding.start) + 1
            column = finding.start - (text.rfind("\n", 0, finding.start) + 1) + 1
            score = f" (score {finding.score:.2f})" if finding.score is not None else ""
            shown = text[finding.start : finding.end].strip()
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            typer.echo(f"{source}:{line}:{column}: {finding.category} {finding.kind}{score}: {finding.action}: {shown}")
        typer.echo(f"{source}: {verdict.action} ({len(verdict.findings)} finding(s))")
    if verdict.action in ("redact", "block"):
        raise typer.Exit(1)


@watermark_app.command("detect")
def detect_command(
    source: Annotated[str, typer.Argument(help="Text file to test, or - to read stdin.")],
    model: Annotated[
        Path,
        typer.Option(
            "--model", help="Full-precision model directory: its tokenizer, and its model for SWEET's entropies."
        ),
    ] = Path("models/model"),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    params: ParamsOption = None,
) -> None:
    """Count the text's green tokens under the key (TISSLM_WATERMARK_KEY, else safety.watermark.key) and
    z-test them: exit 0 whether or not it is watermarked, 2 on unreadable or unscorable input."""
    from tisslm.core.config import project_params
    from tisslm.core.tokenizer import load_tokenizer
    from tisslm.safety.watermark import Watermark, token_entropies

    config = project_params(params)
    settings = config.safety.watermark
    text = _read_text(source)
    if not text.strip():
        raise TissLMError(f"{source}: empty text, nothing to test")
    tokenizer = load_tokenizer(model)
    vocab_size = tokenizer.get_vocab_size()
    ids = tokenizer.encode(text).ids
    watermark = Watermark.from_params(config, vocab_size, enabled=True)  # detection tests whatever the setting
    assert watermark is not None
    entropies = None
    if settings.entropy_threshold > 0:  # SWEET scores only the steps generation biased: the model tells which
        from tisslm.core.model import TissLM

        entropies = token_entropies(TissLM.from_pretrained(model), ids, vocab_size)
    result = watermark.detect(ids, entropies)
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    verdict = "watermarked" if result.watermarked else "not watermarked"
    typer.echo(
        f"{verdict}: z = {result.z:.2f} (threshold {settings.z_threshold:g}), p = {result.p_value:.3g}, "
        f"{result.green} of {result.tokens_scored} scored tokens green"
        + (f", {result.repeated} repeated pairs not scored" if result.repeated else "")
    )


def _read_text(source: str) -> str:
    # Bytes, not text mode: universal newlines would turn \r\n into \n and change the tokens scored.
    if source == "-":
        data = sys.stdin.buffer.read()
    elif Path(source).is_file():
        data = Path(source).read_bytes()
    else:
        raise TissLMError(f"{source}: no such file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TissLMError(f"{source}: not UTF-8 text ({err.reason} at byte {err.start})") from None

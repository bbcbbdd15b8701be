"""`tisslm tiss check | plan | run`: the TissLang command line (a typer sub-app).

Exit status: 0 success; 1 a failed assertion, a failed or timed-out command, a security refusal,
a denied review; 2 a usage, syntax or semantic-check error. Syntax and check errors are printed
as `FILE:LINE:COL: message` with the source line and a caret, all of them at once.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tisslm.core.errors import TissLMError

# The parser (lark), the checks and the AST load when a tiss command runs, so that `tisslm`'s other
# commands and its help skip them; `run`'s engine, sandbox and model adapter (httpx) load inside
# run_command, so that check and plan skip them too.

if TYPE_CHECKING:
    from tisslm.agent import ast
    from tisslm.kb import KnowledgeBase

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="TissLang: check, plan and run agent scripts (.tiss) in a sandbox.",
)

Script = Annotated[Path, typer.Argument(help="The .tiss script.")]
Vars = Annotated[
    list[str] | None, typer.Option("--var", metavar="NAME=VALUE", help="Set a variable: name=value (repeatable).")
]


def _variables(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise TissLMError(f"--var {pair!r}: expected name=value")
        out[name] = value
    return out


def load_checked(path: Path, given: list[str]) -> ast.Script:
    """Parse and check a script; print every error and exit 2 if there is any (warnings: printed only)."""
    from tisslm.agent.checks import check, check_warnings
    from tisslm.agent.parser import TissSyntaxError, parse_file

    try:
        script = parse_file(path)
        source = path.read_text(encoding="utf-8")
        if problems := check(script, given):
            raise TissSyntaxError(str(path), source, problems)
        for warning in check_warnings(script, given):  # --var over VAR, unknown {{...}}: reported, not fatal
            print(warning.render(str(path), source), file=sys.stderr)
    except TissSyntaxError as err:
        print(err.render(), file=sys.stderr)
        count = len(err.diagnostics)
        print(f"{count} error{'s' if count > 1 else ''} in {path}", file=sys.stderr)
        raise typer.Exit(2) from None
    return script


@app.command("check")
def check_command(script: Script, var: Vars = None) -> None:
    """Parse a script and check it: syntax, undefined variables, unknown directives, nested STEP."""
    from tisslm.agent import ast

    parsed = load_checked(script, list(_variables(var)))
    print(f"{script}: ok ({sum(1 for _ in ast.walk(parsed))} statements)")


# ---- plan: a dry run -----------------------------------------------------------------------------


@app.command("plan")
def plan_command(
    script: Script,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan (and the AST) as JSON.")] = False,
    var: Vars = None,
) -> None:
    """Dry run: what would run, in order, with risks flagged. Executes nothing."""
    from tisslm.agent.plan import plan

    parsed = load_checked(script, list(_variables(var)))
    items = plan(parsed, str(script))
    if as_json:
        print(json.dumps({"script": str(script), "steps": items, "ast": parsed.to_dict()}, indent=2))
        return
    for i, item in enumerate(items, 1):
        context = f"[{item['context']}] " if item["context"] else ""
        print(f"{i:3}. {item['at']}  {context}{item['type']} {item['what']}")
        for risk in item["risks"]:
            print(f"       ! {risk}")
    flagged = sum(1 for item in items if item["risks"])
    print(f"{len(items)} steps, {flagged} flagged")


# ---- run -----------------------------------------------------------------------------------------


def _content_filter():
    """The content filter of ./params.yaml (else the defaults), which every PROMPT_AGENT answer goes through."""
    from tisslm.core.config import project_params
    from tisslm.safety.filters import ContentFilter

    return ContentFilter.from_params(project_params())


def _open_kb(directory: Path) -> KnowledgeBase:
    """The knowledge base for RETRIEVE, opened before anything runs: a bad --kb is a usage error."""
    from tisslm.kb import KnowledgeBase  # only a run with --kb pays for importing the retrieval stack

    return KnowledgeBase.open(directory)


@app.command("run")
def run_command(
    script: Script,
    workspace: Annotated[Path, typer.Option("--workspace", help="The only directory the script may change.")],
    var: Vars = None,
    sandbox: Annotated[str, typer.Option("--sandbox", help="bwrap (default), or none: no isolation.")] = "bwrap",
    timeout: Annotated[float, typer.Option("--timeout", help="Wall-clock limit for the whole run, seconds.")] = 3600.0,
    command_timeout: Annotated[float, typer.Option("--command-timeout", help="Limit for each RUN, seconds.")] = 600.0,
    model: Annotated[
        Path | None, typer.Option("--model", help="TissLM model directory [default: models/model].")
    ] = None,
    base_url: Annotated[str | None, typer.Option("--base-url", help="OpenAI-compatible server instead.")] = None,
    approve_all: Annotated[bool, typer.Option("--approve-all", help="Approve every review (CI).")] = False,
    deny_all: Annotated[bool, typer.Option("--deny-all", help="Deny every review (CI).")] = False,
    audit: Annotated[Path | None, typer.Option("--audit", help="Audit log (JSONL), outside the workspace.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first model call (then +1 per call).")] = 0,
    kb: Annotated[
        Path | None, typer.Option("--kb", help="Knowledge base directory (tisslm kb build) for RETRIEVE.")
    ] = None,
) -> None:
    """Run a script: RUN in the sandbox, READ/WRITE inside the workspace, every step audited."""
    from tisslm.agent.adapter import make_adapter
    from tisslm.agent.audit import AuditLog, default_audit_path, sha256
    from tisslm.agent.interpreter import Engine, ScriptFailure
    from tisslm.agent.review import Reviewer
    from tisslm.agent.sandbox import SANDBOX_UID, Limits, make_sandbox
    from tisslm.agent.workspace import Workspace

    if approve_all and deny_all:
        raise TissLMError("pass --approve-all or --deny-all, not both")
    if timeout <= 0 or command_timeout <= 0:
        raise TissLMError("--timeout and --command-timeout must be positive")
    variables = _variables(var)
    parsed = load_checked(script, list(variables))
    knowledge = _open_kb(kb) if kb is not None else None
    workspace.mkdir(parents=True, exist_ok=True)
    # A root caller's commands run as uid 65534 (see sandbox.py), so the workspace becomes theirs.
    owner = (SANDBOX_UID, SANDBOX_UID) if sandbox == "bwrap" and os.geteuid() == 0 else None
    space = Workspace(workspace, owner)
    space.hand_over()
    box = make_sandbox(sandbox, space.root)
    log = AuditLog(audit or default_audit_path(script), space.root)
    source = script.read_text(encoding="utf-8")
    log.record("script", path=str(script), sha256=sha256(source), variables=sorted(variables),
               kb=None if knowledge is None else str(knowledge.directory.resolve()))  # fmt: skip
    policy = "approve" if approve_all else "deny" if deny_all else "ask"
    engine = Engine(
        parsed,
        space,
        box,
        limits=Limits(timeout_s=command_timeout, cpu_s=math.ceil(command_timeout)),
        adapter=make_adapter(model, base_url),
        reviewer=Reviewer(policy),
        kb=knowledge,
        audit=log,
        variables=variables,
        run_timeout_s=timeout,
        seed=seed,
        content_filter=_content_filter(),
    )
    try:
        outcome = engine.run()
    except ScriptFailure as failure:
        print(failure.report(str(script), source), file=sys.stderr)
        print(f"run stopped; audit log: {log.path}", file=sys.stderr)
        raise typer.Exit(1) from None
    finally:
        log.close()
        if knowledge is not None:
            knowledge.close()
    print(f"ok: {outcome.runs} commands; audit log: {log.path}")

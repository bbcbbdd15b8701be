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

RISKS = [
    (re.compile(r"\brm\s+-\w*[rf]"), "deletes files"),
    (re.compile(r"\b(curl|wget|ssh|scp|rsync|git\s+(push|pull|clone|fetch)|pip\s+install|npm\s+install|apt(-get)?)\b"),
     "needs the network, which the sandbox does not have"),
    (re.compile(r"\b(sudo|su|chown|chmod|mount)\b"), "asks for privileges the sandbox does not grant"),
    (re.compile(r"\b(dd|mkfs\w*|shred)\b"), "can destroy data"),
]  # fmt: skip


def _risks(node: ast.Node, model_vars: set[str]) -> list[str]:
    from tisslm.agent import ast
    from tisslm.agent.checks import interpolated

    risks = []
    match node:
        case ast.Run(command=command):
            risks += [why for pattern, why in RISKS if pattern.search(command)]
            if used := sorted(set(interpolated(command)) & model_vars):
                risks.append(f"built from model output ({', '.join(used)}; shell-quoted)")
        case ast.Write(path=path) | ast.Read(path=path):
            if path.startswith("/") or ".." in Path(path).parts:
                risks.append("will be refused: outside the workspace")
            if (
                isinstance(node, ast.Write)
                and node.interpolate
                and (used := set(interpolated(node.content)) & model_vars)
            ):
                risks.append(f"writes model output ({', '.join(sorted(used))}) into a file")
        case ast.PromptAgent():
            risks.append("calls the model (counts against API_CALLS and TOKEN_COUNT)")
        case ast.Retrieve():
            risks.append("reads the knowledge base (needs --kb DIR)")
        case ast.Pause() | ast.RequestReview() | ast.Choose():
            risks.append("waits for a reviewer (or --approve-all / --deny-all)")
    return risks


def _describe(node: ast.Node) -> str:
    from tisslm.agent import ast
    from tisslm.agent.interpreter import DEFAULT_TOP
    from tisslm.agent.parser import format_expr

    match node:
        case ast.Run(command=text) | ast.Log(text=text) | ast.Pause(text=text) | ast.RequestReview(text=text):
            return text
        case ast.Write(path=path, content=content, delimiter=delimiter):
            return f"{path} ({len(content.splitlines())} lines, <<{delimiter})"
        case ast.Read(path=path, name=name):
            return f"{path} -> {name}"
        case ast.Assert(condition=expr) | ast.If(condition=expr):
            return format_expr(expr)
        case ast.Var(name=name, value=expr):
            return f"{name} = {format_expr(expr)}"
        case ast.PromptAgent(prompt=prompt, into=into):
            return f"{prompt!r} -> {into}"
        case ast.Retrieve(query=query, into=into, top=top):
            return f"{query!r} -> {into} (top {DEFAULT_TOP if top is None else top})"
        case ast.SetBudget(budget=budget, value=value):
            return f"{budget} = {value}"
        case ast.Directive(name=name, value=value):
            return f"@{name} {value!r}"
        case ast.Task(title=text) | ast.Step(title=text) | ast.Option(label=text):
            return text
        case ast.Setup(title=title):
            return title or ""
        case ast.Choose(options=options):
            return " | ".join(option.label for option in options)
    return ""


def plan(script: ast.Script, filename: str) -> list[dict]:
    """Every statement in execution order, with the branch it sits in and the risks it carries."""
    from tisslm.agent import ast
    from tisslm.agent.parser import format_expr

    items: list[dict] = []
    model_vars = {n.into for n in ast.walk(script) if isinstance(n, ast.PromptAgent)}

    def visit(body: tuple, context: list[str]) -> None:
        for node in body:
            items.append({
                "at": f"{filename}:{node.span.line}:{node.span.column}",
                "type": type(node).__name__,
                "what": _describe(node),
                "context": " > ".join(context),
                "risks": _risks(node, model_vars),
            })  # fmt: skip
            match node:
                case ast.If(condition=condition, then=then, orelse=orelse):
                    visit(then, [*context, f"if {format_expr(condition)}"])
                    visit(orelse or (), [*context, f"else (not {format_expr(condition)})"])
                case ast.Try(body=body, catch=catch):
                    visit(body, [*context, "try"])
                    visit(catch, [*context, "on failure"])
                case ast.Choose(options=options):
                    for option in options:
                        visit(option.body, [*context, f"option {option.label!r}"])
                case ast.EstimateCost(body=body):
                    visit(body, [*context, "estimate only, not run"])
                case ast.Parallel(body=body):
                    visit(body, [*context, "in parallel"])
                case _:
                    visit(ast.children(node), context)

    visit(script.body, [])
    return items


@app.command("plan")
def plan_command(
    script: Script,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan (and the AST) as JSON.")] = False,
    var: Vars = None,
) -> None:
    """Dry run: what would run, in order, with risks flagged. Executes nothing."""
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

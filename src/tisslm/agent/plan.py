"""`tisslm tiss plan`'s dry run: every statement of a checked script in execution order, with the
branch it sits in and the risks it carries. Nothing here runs a statement."""

from __future__ import annotations

import re
from pathlib import Path

from tisslm.agent import ast
from tisslm.agent.checks import interpolated
from tisslm.agent.interpreter import DEFAULT_TOP
from tisslm.agent.parser import format_expr

RISKS = [
    (re.compile(r"\brm\s+-\w*[rf]"), "deletes files"),
    (re.compile(r"\b(curl|wget|ssh|scp|rsync|git\s+(push|pull|clone|fetch)|pip\s+install|npm\s+install|apt(-get)?)\b"),
     "needs the network, which the sandbox does not have"),
    (re.compile(r"\b(sudo|su|chown|chmod|mount)\b"), "asks for privileges the sandbox does not grant"),
    (re.compile(r"\b(dd|mkfs\w*|shred)\b"), "can destroy data"),
]  # fmt: skip


def _risks(node: ast.Node, model_vars: set[str]) -> list[str]:
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

"""Semantic checks: what parses but cannot mean anything, found before anything runs.

`tisslm tiss check` runs these after the parser, and `run` refuses a script that fails them, so
that a typo in a variable name is reported at its line instead of an hour into a run.
`check_warnings` finds what runs but probably not as meant (a VAR that a `--var` overrides, a
`{{...}}` that interpolation does not know); those are printed and do not stop anything.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from tisslm.agent import ast
from tisslm.agent.parser import Diagnostic

DIRECTIVES = ("persona", "output", "language")
# What `{{...}}` may hold: a variable, or a field of the latest RUN or PROMPT_AGENT.
FIELDS = {
    "LAST_RUN": ("EXIT_CODE", "STDOUT", "STDERR", "DURATION", "TIMED_OUT"),
    "LAST_PROMPT": ("MEAN_ENTROPY", "MAX_ENTROPY"),
}
INTERPOLATION = re.compile(
    r"\{\{\s*(?:(?P<object>LAST_RUN|LAST_PROMPT)\s*\.\s*(?P<field>EXIT_CODE|STDOUT|STDERR|DURATION|TIMED_OUT"
    r"|MEAN_ENTROPY|MAX_ENTROPY)|(?P<name>[A-Za-z_][A-Za-z0-9_]*))\s*\}\}"
)
PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}")  # anything that looks like one, supported or not
DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
BUILTINS = ("LAST_ERROR",)  # set when a CATCH block starts: the message of what failed
MAX_TOP = 1000  # RETRIEVE ... TOP k: the knowledge base's own limit on k (tisslm.kb.index.MAX_K)


def parse_duration(text: str) -> float | None:
    """Seconds in "90", "30s", "5m", "1.5h", "250ms"; None when it is not a duration."""
    found = DURATION.fullmatch(text.strip())
    return float(found.group(1)) * UNITS[found.group(2)] if found else None


def interpolated(text: str) -> list[str]:
    """The variable names a string interpolates with `{{name}}` (not `{{LAST_RUN.FIELD}}`)."""
    return [m["name"] for m in INTERPOLATION.finditer(text) if m["name"] and m["name"] not in FIELDS]


def unsupported_placeholders(text: str) -> list[str]:
    """Why each `{{...}}` in `text` that interpolation leaves as it is (it is printed literally)."""
    problems = []
    for found in PLACEHOLDER.finditer(text):
        if INTERPOLATION.fullmatch(found.group()) and found.group(1).strip() not in FIELDS:
            continue
        inside = found.group(1).strip()
        head, _, field = (part.strip() for part in inside.partition("."))
        if head in FIELDS:
            fields = FIELDS[head]
            close = difflib.get_close_matches(field.upper(), fields, n=1)
            hint = f"did you mean {{{{{head}.{close[0]}}}}}? " if close else ""
            problems.append(
                f"{found.group()} is not a field of {head}: {hint}{head} has {', '.join(fields)} "
                "(the text is printed literally)"
            )
        else:
            problems.append(
                f"unsupported placeholder {found.group()} is printed literally: use {{{{name}}}} for a variable, "
                "{{LAST_RUN.FIELD}} or {{LAST_PROMPT.FIELD}}"
            )
    return problems


def _strings(node: ast.Node) -> Iterable[str]:
    """The strings of a statement (not of its children) that `{{var}}` interpolation applies to."""
    match node:
        case ast.Run(command=text) | ast.Log(text=text) | ast.Pause(text=text) | ast.RequestReview(text=text):
            yield text
        case ast.PromptAgent(prompt=text) | ast.Read(path=text) | ast.Directive(value=text):
            yield text
        case ast.Retrieve(query=text):
            yield text
        case ast.Write(path=path, content=content, interpolate=interpolate):
            yield path
            if interpolate:
                yield content


def _expr_names(expr: ast.Expr) -> Iterable[tuple[str, ast.Span]]:
    match expr:
        case ast.VarRef(name=name):
            yield name, expr.span
        case ast.Literal(value=str(text)) | ast.FileExists(path=text):
            yield from ((name, expr.span) for name in interpolated(text))
        case ast.Binary(left=left, right=right):
            yield from _expr_names(left)
            yield from _expr_names(right)
        case ast.Not(operand=operand) | ast.IsEmpty(operand=operand):
            yield from _expr_names(operand)


def _uses(node: ast.Node) -> Iterable[tuple[str, ast.Span]]:
    for text in _strings(node):
        yield from ((name, node.span) for name in interpolated(text))
    match node:
        case ast.Assert(condition=expr) | ast.Var(value=expr) | ast.If(condition=expr):
            yield from _expr_names(expr)


def _defines(node: ast.Node) -> str | None:
    match node:
        case ast.Var(name=name) | ast.Read(name=name) | ast.PromptAgent(into=name) | ast.Retrieve(into=name):
            return name
    return None


class _Checker:
    def __init__(self, given: Iterable[str]):
        self.defined = set(given) | set(BUILTINS)
        self.errors: list[Diagnostic] = []

    def error(self, span: ast.Span, message: str) -> None:
        self.errors.append(Diagnostic(span.line, span.column, message))

    def visit(self, body: tuple, in_step: bool = False, estimating: bool = False) -> None:
        for node in body:
            self.statement(node, in_step, estimating)

    def statement(self, node: ast.Node, in_step: bool, estimating: bool) -> None:
        for name, span in _uses(node):
            if name not in self.defined:
                self.error(
                    span,
                    f"undefined variable {name!r} "
                    "(define it with VAR, READ ... AS, PROMPT_AGENT ... INTO, RETRIEVE ... INTO or --var)",
                )
        match node:
            case ast.Step() if in_step:
                self.error(node.span, "STEP inside a STEP: steps do not nest (use a block such as IF or TRY)")
            case ast.Directive(name=name) if name not in DIRECTIVES:
                self.error(node.span, f"unknown directive @{name} (one of {', '.join('@' + d for d in DIRECTIVES)})")
            case ast.SetBudget(budget="EXECUTION_TIME", value=value) if parse_duration(str(value)) is None:
                self.error(node.span, f'EXECUTION_TIME wants a duration such as "90s", "5m" or "1h", not {value!r}')
            case ast.SetBudget(budget=budget, value=value) if budget != "EXECUTION_TIME" and not (
                isinstance(value, int) or str(value).isdigit()
            ):
                self.error(node.span, f"{budget} wants a whole number, not {value!r}")
            case ast.Retrieve(top=top) if top is not None and not 1 <= top <= MAX_TOP:
                self.error(node.span, f"RETRIEVE ... TOP wants 1 to {MAX_TOP} chunks, not {top}")
            case ast.Parallel(body=body):
                for child in body:
                    if not isinstance(child, ast.Run):
                        self.error(child.span, "PARALLEL holds RUN commands only (they run at the same time)")
        if (name := _defines(node)) and not estimating:
            self.defined.add(name)
        in_step = in_step or isinstance(node, ast.Step)
        estimating = estimating or isinstance(node, ast.EstimateCost)
        if isinstance(node, ast.Choose):
            for option in node.options:
                self.visit(option.body, in_step, estimating)
        else:
            self.visit(ast.children(node), in_step, estimating)


def check(script: ast.Script, given: Iterable[str] = ()) -> list[Diagnostic]:
    """Every semantic problem of `script`; `given` names the variables passed with --var."""
    checker = _Checker(given)
    checker.visit(script.body)
    return checker.errors


def _expr_strings(expr: ast.Expr) -> Iterable[tuple[str, ast.Span]]:
    match expr:
        case ast.Literal(value=str(text)) | ast.FileExists(path=text):
            yield text, expr.span
        case ast.Binary(left=left, right=right):
            yield from _expr_strings(left)
            yield from _expr_strings(right)
        case ast.Not(operand=operand) | ast.IsEmpty(operand=operand):
            yield from _expr_strings(operand)


def check_warnings(script: ast.Script, given: Iterable[str] = ()) -> list[Diagnostic]:
    """What runs, but probably not as meant: a VAR that a `--var` of the same name overrides (the
    command line wins, as with make's and ansible's variables), a READ ... AS or ... INTO that
    replaces a `--var`, and `{{...}}` placeholders that interpolation does not know (printed as is)."""
    given = set(given)
    out: list[Diagnostic] = []

    def warn(span: ast.Span, message: str) -> None:
        out.append(Diagnostic(span.line, span.column, message, severity="warning"))

    for node in ast.walk(script):
        match node:
            case ast.Var(name=name) if name in given:
                warn(node.span, f"VAR {name} is skipped: --var {name}=... on the command line wins over the script")
            case ast.Read(name=name) | ast.PromptAgent(into=name) | ast.Retrieve(into=name) if name in given:
                warn(node.span, f"{name} was given with --var, and this statement replaces its value when it runs")
        strings = [(text, node.span) for text in _strings(node)]
        if isinstance(node, ast.Assert | ast.Var | ast.If):
            strings += list(_expr_strings(node.condition if not isinstance(node, ast.Var) else node.value))
        for text, span in strings:
            for problem in unsupported_placeholders(text):
                warn(span, problem)
    return out

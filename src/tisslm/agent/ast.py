"""The TissLang syntax tree: frozen dataclasses that carry their source span.

Nodes are immutable so that the checker, the planner and the engine can share one tree without
defensive copies, and every node knows where it came from so that any report (a syntax error, a
failed ASSERT, a refused WRITE) can point at `FILE:LINE:COL`. `to_dict()` gives the JSON AST
(`tisslm tiss plan --json`, the audit log, and the formatter round-trip test compare these).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Span:
    """1-based line and column of a node's first character, and of the character after its end."""

    line: int
    column: int
    end_line: int
    end_column: int

    def at(self, filename: str) -> str:
        return f"{filename}:{self.line}:{self.column}"


NO_SPAN = Span(0, 0, 0, 0)  # nodes made by code rather than parsed (the formatter tests build some)


@dataclass(frozen=True)
class Node:
    span: Span

    def to_dict(self, spans: bool = True) -> dict[str, Any]:
        """A JSON-ready dict: `{"type": ..., "span": [line, col, end_line, end_col], fields...}`."""
        out: dict[str, Any] = {"type": type(self).__name__}
        if spans:
            s = self.span
            out["span"] = [s.line, s.column, s.end_line, s.end_column]
        for f in fields(self):
            if f.name != "span":
                out[f.name] = _plain(getattr(self, f.name), spans)
        return out


def _plain(value: Any, spans: bool) -> Any:
    if isinstance(value, Node):
        return value.to_dict(spans)
    if isinstance(value, tuple):
        return [_plain(v, spans) for v in value]
    return value


# ---- expressions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Literal(Node):
    """A string (with `{{var}}` still in it), integer, float or boolean."""

    value: str | int | float | bool


@dataclass(frozen=True)
class VarRef(Node):
    name: str


@dataclass(frozen=True)
class LastRun(Node):
    field: str  # EXIT_CODE, STDOUT, STDERR, DURATION, TIMED_OUT


@dataclass(frozen=True)
class LastPrompt(Node):
    field: str  # MEAN_ENTROPY, MAX_ENTROPY: of the latest PROMPT_AGENT's answer


@dataclass(frozen=True)
class FileExists(Node):
    path: str


@dataclass(frozen=True)
class Binary(Node):
    """`left OP right` for OP in AND, OR, CONTAINS, NOT CONTAINS, MATCHES, == != < <= > >=."""

    op: str
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Not(Node):
    operand: Expr


@dataclass(frozen=True)
class IsEmpty(Node):
    operand: Expr


Expr = Literal | VarRef | LastRun | LastPrompt | FileExists | Binary | Not | IsEmpty


# ---- commands ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run(Node):
    command: str


@dataclass(frozen=True)
class Write(Node):
    """`WRITE "path" <<DELIM`: `content` is the body exactly, each line ending in a newline."""

    path: str
    content: str
    delimiter: str  # also the body's language hint (<<PYTHON)
    interpolate: bool  # False for <<'DELIM'


@dataclass(frozen=True)
class Read(Node):
    path: str
    name: str


@dataclass(frozen=True)
class Assert(Node):
    condition: Expr


@dataclass(frozen=True)
class Var(Node):
    name: str
    value: Expr


@dataclass(frozen=True)
class PromptAgent(Node):
    prompt: str
    into: str


@dataclass(frozen=True)
class Retrieve(Node):
    """`RETRIEVE "query" INTO name [TOP k]`: the knowledge base's best chunks for the query, as text."""

    query: str
    into: str
    top: int | None  # None: the engine's default


@dataclass(frozen=True)
class SetBudget(Node):
    budget: str  # EXECUTION_TIME, API_CALLS, TOKEN_COUNT
    value: str | int


@dataclass(frozen=True)
class Log(Node):
    text: str


@dataclass(frozen=True)
class Pause(Node):
    text: str


@dataclass(frozen=True)
class RequestReview(Node):
    text: str


@dataclass(frozen=True)
class Directive(Node):
    name: str  # without the @
    value: str


# ---- blocks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task(Node):
    """`TASK "title"` (a heading: body is None) or `TASK "title" { ... }`."""

    title: str
    body: tuple[Stmt, ...] | None


@dataclass(frozen=True)
class Setup(Node):
    title: str | None
    body: tuple[Stmt, ...]


@dataclass(frozen=True)
class Step(Node):
    title: str
    body: tuple[Stmt, ...]


@dataclass(frozen=True)
class If(Node):
    condition: Expr
    then: tuple[Stmt, ...]
    orelse: tuple[Stmt, ...] | None


@dataclass(frozen=True)
class Try(Node):
    body: tuple[Stmt, ...]
    catch: tuple[Stmt, ...]


@dataclass(frozen=True)
class Parallel(Node):
    body: tuple[Stmt, ...]


@dataclass(frozen=True)
class Option(Node):
    label: str
    body: tuple[Stmt, ...]


@dataclass(frozen=True)
class Choose(Node):
    options: tuple[Option, ...]


@dataclass(frozen=True)
class EstimateCost(Node):
    body: tuple[Stmt, ...]


Stmt = (
    Run
    | Write
    | Read
    | Assert
    | Var
    | PromptAgent
    | Retrieve
    | SetBudget
    | Log
    | Pause
    | RequestReview
    | Directive
    | Task
    | Setup
    | Step
    | If
    | Try
    | Parallel
    | Choose
    | EstimateCost
)


@dataclass(frozen=True)
class Script(Node):
    """A whole `.tiss` file: the `#TISS! Language=...` header's language (or None) and its statements."""

    language: str | None
    body: tuple[Stmt, ...]


def children(node: Node) -> tuple[Stmt, ...]:
    """The statements directly inside a block node, in source order (both branches of an IF)."""
    match node:
        case Script() | Setup() | Step() | Parallel() | EstimateCost() | Option():
            return node.body
        case Task():
            return node.body or ()
        case If():
            return node.then + (node.orelse or ())
        case Try():
            return node.body + node.catch
        case Choose():
            return node.options
    return ()


def walk(node: Node):
    """Every statement below `node`, depth first, in source order."""
    for child in children(node):
        yield child
        yield from walk(child)

"""TissLang source -> syntax tree (ast.py), and syntax tree -> source (the formatter).

Parsing happens in three passes:
1. Heredocs are lifted out line by line: a body is raw text (blank lines, indentation, quotes and
   `}` kept exactly), which no token grammar can describe, so the body lines are blanked in the
   text that lark sees (line numbers stay right) and the bodies are kept aside by line.
2. lark parses what is left with the LALR grammar in grammar.lark. A user wants every mistake in
   one go, so after each syntax error the offending line is replaced by a stand-in with the same
   braces and the text is parsed again; each pass reports one more error.
3. A transformer builds the frozen dataclasses, decoding string escapes and attaching `ELSE` /
   `CATCH` lines to their IF / TRY; its errors (a bad escape, an ELSE without IF) join the list.

`format_script` writes a tree back as text that parses to the same tree (the round-trip test).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import lark
from lark import Lark, Token, Transformer, Tree, UnexpectedCharacters, UnexpectedInput, UnexpectedToken, v_args
from lark.grammar import Rule
from lark.lexer import TerminalDef

from tisslm.agent import ast
from tisslm.agent.ast import Span
from tisslm.core.errors import TissLMError

HEADER = re.compile(r"#TISS!(?:[ \t]+Language=([A-Za-z0-9_+-]+))?[ \t]*$")
HEREDOC_START = re.compile(r'\bWRITE\s+"(?:[^"\\\n]|\\.)*"\s*<<(\'?)([A-Za-z_][A-Za-z0-9_]*)\1\s*$')
BUDGETS = ("EXECUTION_TIME", "API_CALLS", "TOKEN_COUNT")
ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}
MAX_PASSES = 100  # a file with more syntax errors than this reports the first hundred


@dataclass(frozen=True)
class Diagnostic:
    """One problem at a source position; printed as `FILE:LINE:COL: message`, the line and a caret."""

    line: int
    column: int
    message: str
    severity: str = "error"  # or "warning": printed with that prefix, and not a reason to stop

    def render(self, filename: str, source: str) -> str:
        lines = source.split("\n")
        text = lines[self.line - 1].rstrip("\r") if 0 < self.line <= len(lines) else ""
        caret = "".join(c if c == "\t" else " " for c in text[: self.column - 1]) + "^"
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{filename}:{self.line}:{self.column}: {prefix}{self.message}\n    {text}\n    {caret}"


class TissSyntaxError(TissLMError):
    """Every syntax (or semantic check) error of a script; exit status 2."""

    exit_code = 2

    def __init__(self, filename: str, source: str, diagnostics: list[Diagnostic]):
        self.filename, self.source = filename, source
        self.diagnostics = sorted(diagnostics, key=lambda d: (d.line, d.column))
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(d.render(self.filename, self.source) for d in self.diagnostics)


GRAMMAR = Path(__file__).with_name("grammar.lark")
# The parser lark builds from GRAMMAR, saved as JSON (`tools/tisslang_tables.py` writes it). Computing
# the LALR tables takes about 50 ms, a sixth of `tisslm tiss check`; loading them about 6 ms. JSON, not
# lark's pickle-based cache: nothing is unpickled from disk.
PARSE_TABLES = Path(__file__).with_name("grammar_tables.json")
LARK_OPTIONS: dict[str, Any] = {
    "parser": "lalr",
    "lexer": "contextual",
    "propagate_positions": True,
    "maybe_placeholders": False,
}


def _tables_key(grammar: str) -> dict[str, Any]:
    """What saved tables must have been made from to stand for a parser of `grammar`."""
    sha256 = hashlib.sha256(grammar.encode()).hexdigest()
    return {"grammar_sha256": sha256, "lark": lark.__version__, "options": LARK_OPTIONS}


def parse_tables(grammar: str) -> dict[str, Any]:
    """A parser of `grammar` as JSON-ready data: what PARSE_TABLES holds."""
    data, memo = Lark(grammar, **LARK_OPTIONS).memo_serialize([TerminalDef, Rule])
    return {"key": _tables_key(grammar), "data": data, "memo": memo}


def _int_keys(obj: dict[str, Any]) -> dict[Any, Any]:
    # JSON turned the tables' integer keys (states, memo ids) into strings; no other key is all digits
    return {int(k) if k.isdigit() else k: v for k, v in obj.items()}


@cache
def _lark() -> Lark:
    """The parser: loaded from PARSE_TABLES when they were made from this grammar by this lark and with
    these options, else built (correct, only slower; a test keeps the shipped tables current)."""
    grammar = GRAMMAR.read_text()
    try:
        saved = json.loads(PARSE_TABLES.read_text(), object_hook=_int_keys)
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict) and saved.get("key") == _tables_key(grammar):
        return Lark.load({"data": saved["data"], "memo": saved["memo"]})  # a dict: lark reads it as is
    return Lark(grammar, **LARK_OPTIONS)


# ---- pass 1: heredocs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Heredoc:
    content: str
    delimiter: str
    interpolate: bool


def code_of(line: str) -> str:
    """The line without its `#` comment (a `#` inside a string is text, not a comment)."""
    in_string = escaped = False
    for i, char in enumerate(line):
        if escaped:
            escaped = False
        elif char == "\\" and in_string:
            escaped = True
        elif char == '"':
            in_string = not in_string
        elif char == "#" and not in_string:
            return line[:i]
    return line


def _lift_heredocs(lines: list[str], errors: list[Diagnostic]) -> dict[int, _Heredoc]:
    """Blank every heredoc body (and its closing line) in `lines`; return the bodies by start line."""
    bodies: dict[int, _Heredoc] = {}
    i = 0
    while i < len(lines):
        found = HEREDOC_START.search(code_of(lines[i]))
        if not found:
            i += 1
            continue
        delimiter, start = found.group(2), i
        i += 1
        while i < len(lines) and lines[i].strip() != delimiter:
            i += 1
        body = lines[start + 1 : i]
        if i == len(lines):
            column = lines[start].index("<<", found.start()) + 1
            errors.append(
                Diagnostic(
                    start + 1, column, f"heredoc <<{delimiter} is never closed: end it with a line `{delimiter}`"
                )
            )
        content = "".join(line + "\n" for line in body)
        bodies[start + 1] = _Heredoc(content, delimiter, interpolate=not found.group(1))
        for j in range(start + 1, min(i + 1, len(lines))):
            lines[j] = ""
        i += 1
    return bodies


# ---- pass 2: lark, again after each error --------------------------------------------------------

_FRIENDLY = {
    "_NL": "end of line",
    "$END": "end of file",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LPAR": "'('",
    "RPAR": "')'",
    "EQUAL": "'='",
    "DOT": "'.'",
    "STRING": 'a "string"',
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "HEREDOC": "<<DELIM",
    "DIRECTIVE": "@directive",
    "COMPARE": "a comparison",
    "FIELD": "EXIT_CODE, STDOUT, STDERR, DURATION or TIMED_OUT",
    "PROMPT_FIELD": "MEAN_ENTROPY or MAX_ENTROPY",
}


STATEMENTS = ("TASK", "SETUP", "STEP", "IF", "ELSE", "TRY", "CATCH", "PARALLEL", "CHOOSE", "OPTION",
              "ESTIMATE_COST", "RUN", "WRITE", "READ", "ASSERT", "VAR", "PROMPT_AGENT", "RETRIEVE", "SET_BUDGET",
              "LOG", "PAUSE", "REQUEST_REVIEW")  # fmt: skip
OPERATORS = ("CONTAINS", "MATCHES", "IS_EMPTY", "AND", "OR", "NOT", "THEN", "EXISTS", "AS", "INTO", "TOP")
BINARY = {"CONTAINS", "MATCHES", "COMPARE", "AND", "OR", "NOT", "EQUAL"}  # want a value on their right
FIELD_NAMES = {
    "FIELD": ("EXIT_CODE", "STDOUT", "STDERR", "DURATION", "TIMED_OUT"),
    "PROMPT_FIELD": ("MEAN_ENTROPY", "MAX_ENTROPY"),
}


def _describe(token: Token) -> str:
    if token.type == "$END":
        return "end of file"
    if token.type == "_NL":
        return "end of line"
    return repr(str(token))


def _suggest(word: str, candidates) -> str:
    """` (did you mean X?)` for the candidate nearest `word`, or nothing."""
    if word.upper() in candidates and word != word.upper():
        return f" (keywords are in capitals: did you mean {word.upper()}?)"
    close = difflib.get_close_matches(word.upper(), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _expected(names) -> str:
    expected = sorted(_FRIENDLY.get(name, name) for name in names if not name.startswith("__"))
    if "RUN" in names:
        return "a command or block (RUN, WRITE, STEP, IF, ...)"
    return ", ".join(expected) or "something else"


def _message(err: UnexpectedInput) -> str:
    if isinstance(err, UnexpectedToken):
        token, expected = err.token, set(err.expected)
        history = [t for t in (getattr(err, "token_history", None) or []) if t is not None]
        previous = history[-1] if history else None
        if token.type == "EQUAL" and "COMPARE" in expected:
            return "'=' does not compare: did you mean '=='?"
        if token.type in ("_NL", "$END", "RPAR", "RBRACE") and previous is not None:
            operator = str(previous) if str(previous).isalpha() else repr(str(previous))
            if previous.type in BINARY:
                needs = "a condition after it" if previous.type == "NOT" else "a value on its right"
                found = "" if token.type in ("_NL", "$END") else f", not {_describe(token)}"
                return f"{operator} needs {needs}{found}"
            if token.type in ("_NL", "$END") and str(previous).isupper() and previous.type == str(previous):
                return f"{previous} needs {_expected(expected)} after it"
        if previous is not None and previous.type == "NAME" and str(previous) in BINARY - {"NOT"}:
            return f"{previous} needs a value on its left"  # `ASSERT CONTAINS "x"`: read as a variable
        if token.type == "LBRACE" and "THEN" in expected:
            return "IF needs THEN before its block: IF condition THEN { ... }"
        hint = ""
        if token.type == "NAME":
            if "RUN" in expected:
                return f"unknown keyword {str(token)!r}{_suggest(str(token), STATEMENTS)}"
            fields = [value for name in expected & FIELD_NAMES.keys() for value in FIELD_NAMES[name]]
            hint = _suggest(str(token), fields or [n for n in OPERATORS if n in expected])
        return f"unexpected {_describe(token)}; expected {_expected(expected)}{hint}"
    if isinstance(err, UnexpectedCharacters):
        if err.char == '"':
            return 'unterminated string (a string ends with " on the same line)'
        if err.char == "=" and "COMPARE" in err.allowed:
            return "'=' does not compare: did you mean '=='?"
        return f"unexpected character {err.char!r}"
    return str(err).splitlines()[0]


def _position(err: UnexpectedInput) -> tuple[int, int]:
    """Where to point: at an operator left without its operand, else at the unexpected input."""
    if isinstance(err, UnexpectedToken):
        history = [t for t in (getattr(err, "token_history", None) or []) if t is not None]
        previous = history[-1] if history else None
        if (
            previous is not None
            and previous.line == err.line
            and (
                (previous.type in BINARY and err.token.type in ("_NL", "$END", "RPAR", "RBRACE"))
                or (previous.type == "NAME" and str(previous) in BINARY)
            )
        ):
            return previous.line, previous.column
    return err.line, err.column


def _braces(code: str) -> int:
    """Net `{` minus `}` outside strings."""
    return sum({"{": 1, "}": -1}.get(c, 0) for c in re.sub(r'"(?:[^"\\\n]|\\.)*"?', "", code))


def _unclosed_brace(lines: list[str]) -> tuple[int, int] | None:
    """Line and column of the last `{` that is never closed."""
    stack: list[tuple[int, int]] = []
    for n, line in enumerate(lines, 1):
        code = code_of(line)
        for m in re.finditer(r'"(?:[^"\\\n]|\\.)*"?|[{}]', code):
            if m.group() == "{":
                stack.append((n, m.start() + 1))
            elif m.group() == "}" and stack:
                stack.pop()
    return stack[-1] if stack else None


def _inside_word(text: str, line: int, column: int) -> Diagnostic | None:
    """`RUNN "x"` lexes as RUN then a stray N: name the whole word instead of its last letter."""
    start = column - 1
    if start >= len(text) or not (text[start].isalnum() or text[start] == "_"):
        return None  # the error is after a word (a missing operand), not inside one
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_"):
        start -= 1
    if start == column - 1:
        return None
    word = re.match(r"\w*", text[start:]).group()
    first = not code_of(text)[:start].strip()
    return Diagnostic(line, start + 1, f"unknown keyword {word!r}{_suggest(word, STATEMENTS if first else OPERATORS)}")


def _parse_tree(lines: list[str], errors: list[Diagnostic]) -> Tree | None:
    seen: set[tuple[int, int]] = set()
    for _ in range(MAX_PASSES):
        try:
            return _lark().parse("\n".join(lines).rstrip("\n") + "\n")  # a last line without newline still ends in one
        except UnexpectedInput as err:
            at_end = isinstance(err, UnexpectedToken) and err.token.type == "$END"
            if at_end and (opened := _unclosed_brace(lines)):
                errors.append(Diagnostic(*opened, "this block is never closed: add a '}'"))
                return None
            line, column = _position(err) if err.line > 0 else (len(lines), 1)
            if (line, column) in seen or at_end:
                errors.append(Diagnostic(line, column, _message(err)))
                return None
            seen.add((line, column))
            errors.append(_inside_word(lines[line - 1], line, column) or Diagnostic(line, column, _message(err)))
            # Stand in for the bad line with one that keeps the braces balanced, and go again.
            net = _braces(code_of(lines[line - 1]))
            lines[line - 1] = "SETUP {" * net if net > 0 else "}" * -net
    return None


# ---- pass 3: tree -> dataclasses -----------------------------------------------------------------


@dataclass(frozen=True)
class _Str:
    value: str
    span: Span


class _Else:
    """A stand-alone `ELSE { ... }` line, waiting for the IF before it."""

    def __init__(self, span: Span, body: tuple):
        self.span, self.body = span, body


class _Catch(_Else):
    """A stand-alone `CATCH { ... }` line, waiting for the TRY before it."""


def _span(meta) -> Span:
    return Span(meta.line, meta.column, meta.end_line, meta.end_column)


def _token_span(token: Token) -> Span:
    return Span(token.line, token.column, token.end_line, token.end_column)


@v_args(meta=True)
class _Build(Transformer):
    def __init__(self, heredocs: dict[int, _Heredoc], errors: list[Diagnostic]):
        super().__init__()
        self.heredocs, self.errors = heredocs, errors

    def _error(self, span: Span, message: str) -> None:
        self.errors.append(Diagnostic(span.line, span.column, message))

    def _statements(self, items: list) -> tuple:
        """Attach each stand-alone ELSE / CATCH to the IF / TRY right before it."""
        out: list = []
        for item in items:
            kind = "CATCH" if isinstance(item, _Catch) else "ELSE" if isinstance(item, _Else) else None
            previous = out[-1] if out else None
            if kind == "ELSE" and isinstance(previous, ast.If) and previous.orelse is None:
                out[-1] = ast.If(_join(previous.span, item.span), previous.condition, previous.then, item.body)
            elif kind == "CATCH" and isinstance(previous, ast.Try) and previous.catch is None:
                out[-1] = ast.Try(_join(previous.span, item.span), previous.body, item.body)
            elif kind:
                self._error(item.span, f"{kind} without {'IF' if kind == 'ELSE' else 'TRY'} before it")
            else:
                out.append(item)
        for node in out:
            if isinstance(node, ast.Try) and node.catch is None:
                self._error(node.span, "TRY without CATCH: add `CATCH { ... }` after its block")
        return tuple(out)

    # strings
    def string(self, meta, items):
        token = items[0]
        raw, out, i = token[1:-1], [], 0
        while i < len(raw):
            if raw[i] == "\\":
                escape = raw[i + 1]
                if escape not in ESCAPES:
                    col = token.column + 1 + i
                    self.errors.append(
                        Diagnostic(token.line, col, f'unknown escape \\{escape} (use \\", \\\\, \\n or \\t)')
                    )
                out.append(ESCAPES.get(escape, escape))
                i += 2
            else:
                out.append(raw[i])
                i += 1
        return _Str("".join(out), _token_span(token))

    # blocks
    def start(self, meta, items):
        return self._statements(items)

    def block(self, meta, items):
        return self._statements(items)

    def task(self, meta, items):
        return ast.Task(_span(meta), items[0].value, items[1] if len(items) > 1 else None)

    def setup(self, meta, items):
        title = items[0].value if isinstance(items[0], _Str) else None
        return ast.Setup(_span(meta), title, items[-1])

    def step(self, meta, items):
        return ast.Step(_span(meta), items[0].value, items[1])

    def if_(self, meta, items):
        return ast.If(_span(meta), _expr(items[0]), items[1], items[2] if len(items) > 2 else None)

    def else_(self, meta, items):
        return _Else(_span(meta), items[0])

    def try_(self, meta, items):
        return ast.Try(_span(meta), items[0], items[1] if len(items) > 1 else None)

    def catch(self, meta, items):
        return _Catch(_span(meta), items[0])

    def parallel(self, meta, items):
        return ast.Parallel(_span(meta), items[0])

    def choose(self, meta, items):
        return ast.Choose(_span(meta), tuple(items))

    def option(self, meta, items):
        return ast.Option(_span(meta), items[0].value, items[1])

    def estimate(self, meta, items):
        return ast.EstimateCost(_span(meta), items[0])

    # commands
    def run(self, meta, items):
        return ast.Run(_span(meta), items[0].value)

    def write(self, meta, items):
        heredoc = self.heredocs[items[1].line]
        return ast.Write(_span(meta), items[0].value, heredoc.content, heredoc.delimiter, heredoc.interpolate)

    def read(self, meta, items):
        return ast.Read(_span(meta), items[0].value, str(items[1]))

    def assert_(self, meta, items):
        return ast.Assert(_span(meta), _expr(items[0]))

    def var(self, meta, items):
        return ast.Var(_span(meta), str(items[0]), _expr(items[1]))

    def prompt(self, meta, items):
        return ast.PromptAgent(_span(meta), items[0].value, str(items[1]))

    def retrieve(self, meta, items):
        top = int(items[2]) if len(items) > 2 else None
        return ast.Retrieve(_span(meta), items[0].value, str(items[1]), top)

    def budget(self, meta, items):
        name, value = items
        if name not in BUDGETS:
            self._error(_token_span(name), f"unknown budget {name!s} (one of {', '.join(BUDGETS)})")
        return ast.SetBudget(_span(meta), str(name), value.value if isinstance(value, _Str) else int(value))

    def log(self, meta, items):
        return ast.Log(_span(meta), items[0].value)

    def pause(self, meta, items):
        return ast.Pause(_span(meta), items[0].value)

    def review(self, meta, items):
        return ast.RequestReview(_span(meta), items[0].value)

    def directive(self, meta, items):
        return ast.Directive(_span(meta), str(items[0])[1:], items[1].value)

    # expressions
    def or_op(self, meta, items):
        return ast.Binary(_span(meta), "OR", _expr(items[0]), _expr(items[1]))

    def and_op(self, meta, items):
        return ast.Binary(_span(meta), "AND", _expr(items[0]), _expr(items[1]))

    def not_op(self, meta, items):
        return ast.Not(_span(meta), _expr(items[0]))

    def compare(self, meta, items):
        return ast.Binary(_span(meta), str(items[1]), _expr(items[0]), _expr(items[2]))

    def contains(self, meta, items):
        return ast.Binary(_span(meta), "CONTAINS", _expr(items[0]), _expr(items[1]))

    def not_contains(self, meta, items):
        return ast.Binary(_span(meta), "NOT CONTAINS", _expr(items[0]), _expr(items[1]))

    def matches(self, meta, items):
        pattern = items[1]
        if isinstance(pattern, _Str) and "{{" not in pattern.value:
            try:
                re.compile(pattern.value)
            except re.error as err:
                self._error(pattern.span, f"invalid regular expression: {err}")
        return ast.Binary(_span(meta), "MATCHES", _expr(items[0]), _expr(pattern))

    def is_empty(self, meta, items):
        return ast.IsEmpty(_span(meta), _expr(items[0]))

    def int_(self, meta, items):
        return ast.Literal(_token_span(items[0]), int(items[0]))

    def float_(self, meta, items):
        return ast.Literal(_token_span(items[0]), float(items[0]))

    def true(self, meta, items):
        return ast.Literal(_span(meta), True)

    def false(self, meta, items):
        return ast.Literal(_span(meta), False)

    def name(self, meta, items):
        return ast.VarRef(_token_span(items[0]), str(items[0]))

    def last_run(self, meta, items):
        return ast.LastRun(_span(meta), str(items[0]))

    def last_prompt(self, meta, items):
        return ast.LastPrompt(_span(meta), str(items[0]))

    def file_exists(self, meta, items):
        return ast.FileExists(_span(meta), items[0].value)


def _expr(item) -> ast.Expr:
    return ast.Literal(item.span, item.value) if isinstance(item, _Str) else item


def _join(first: Span, last: Span) -> Span:
    return Span(first.line, first.column, last.end_line, last.end_column)


# ---- entry points --------------------------------------------------------------------------------


def parse(source: str, filename: str = "<string>") -> ast.Script:
    """Parse a whole script; raise TissSyntaxError listing every error with its line and column."""
    errors: list[Diagnostic] = []
    lines = source.split("\n")
    header = HEADER.match(lines[0].rstrip("\r")) if lines else None
    if header is None:
        errors.append(Diagnostic(1, 1, "a TissLang script starts with the line `#TISS!` (or `#TISS! Language=Python`)"))
    heredocs = _lift_heredocs(lines, errors)
    tree = _parse_tree(lines, errors)
    body: tuple = ()
    if tree is not None:
        body = _Build(heredocs, errors).transform(tree)
    if errors:
        raise TissSyntaxError(filename, source, errors)
    end = Span(len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 1)
    return ast.Script(Span(1, 1, end.line, end.column), header.group(1) if header else None, body)


def parse_file(path: str | Path) -> ast.Script:
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TissLMError(f"{path}: cannot read the script ({err})") from None
    return parse(source, str(path))


# ---- the formatter -------------------------------------------------------------------------------

INDENT = "    "


def quote(text: str) -> str:
    """A TissLang string literal for `text`."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


def format_expr(node: ast.Expr) -> str:
    match node:
        case ast.Literal(value=bool(value)):
            return "TRUE" if value else "FALSE"
        case ast.Literal(value=str(value)):
            return quote(value)
        case ast.Literal(value=value):
            return repr(value)
        case ast.VarRef(name=name):
            return name
        case ast.LastRun(field=field):
            return f"LAST_RUN.{field}"
        case ast.LastPrompt(field=field):
            return f"LAST_PROMPT.{field}"
        case ast.FileExists(path=path):
            return f"FILE {quote(path)} EXISTS"
        case ast.Not(operand=operand):
            return f"NOT {_operand(operand)}"
        case ast.IsEmpty(operand=operand):
            return f"{_operand(operand)} IS_EMPTY"
        case ast.Binary(op=op, left=left, right=right):
            return f"{_operand(left)} {op} {_operand(right)}"
    raise TypeError(f"not an expression: {node!r}")


def _operand(node: ast.Expr) -> str:
    text = format_expr(node)
    return f"({text})" if isinstance(node, ast.Binary | ast.Not | ast.IsEmpty) else text


def _block(body: tuple, depth: int) -> list[str]:
    return ["{", *(line for stmt in body for line in format_stmt(stmt, depth + 1)), INDENT * depth + "}"]


def format_stmt(node: ast.Stmt | ast.Option, depth: int = 0) -> list[str]:
    """The lines of one statement, indented `depth` levels (heredoc bodies are never indented)."""
    pad = INDENT * depth

    def block(head: str, body: tuple) -> list[str]:
        first, *rest = _block(body, depth)
        return [f"{pad}{head} {first}", *rest]

    match node:
        case ast.Run(command=command):
            return [f"{pad}RUN {quote(command)}"]
        case ast.Write(path=path, content=content, delimiter=delim, interpolate=interpolate):
            marker = delim if interpolate else f"'{delim}'"
            return [f"{pad}WRITE {quote(path)} <<{marker}", *content.split("\n")[:-1], delim]
        case ast.Read(path=path, name=name):
            return [f"{pad}READ {quote(path)} AS {name}"]
        case ast.Assert(condition=condition):
            return [f"{pad}ASSERT {format_expr(condition)}"]
        case ast.Var(name=name, value=value):
            return [f"{pad}VAR {name} = {format_expr(value)}"]
        case ast.PromptAgent(prompt=prompt, into=into):
            return [f"{pad}PROMPT_AGENT {quote(prompt)} INTO {into}"]
        case ast.Retrieve(query=query, into=into, top=top):
            return [f"{pad}RETRIEVE {quote(query)} INTO {into}" + ("" if top is None else f" TOP {top}")]
        case ast.SetBudget(budget=budget, value=value):
            return [f"{pad}SET_BUDGET {budget} = {quote(value) if isinstance(value, str) else value}"]
        case ast.Log(text=text):
            return [f"{pad}LOG {quote(text)}"]
        case ast.Pause(text=text):
            return [f"{pad}PAUSE {quote(text)}"]
        case ast.RequestReview(text=text):
            return [f"{pad}REQUEST_REVIEW {quote(text)}"]
        case ast.Directive(name=name, value=value):
            return [f"{pad}@{name} {quote(value)}"]
        case ast.Task(title=title, body=None):
            return [f"{pad}TASK {quote(title)}"]
        case ast.Task(title=title, body=body):
            return block(f"TASK {quote(title)}", body)
        case ast.Setup(title=title, body=body):
            return block("SETUP" if title is None else f"SETUP {quote(title)}", body)
        case ast.Step(title=title, body=body):
            return block(f"STEP {quote(title)}", body)
        case ast.If(condition=condition, then=then, orelse=orelse):
            lines = block(f"IF {format_expr(condition)} THEN", then)
            if orelse is not None:
                first, *rest = _block(orelse, depth)
                lines[-1] += f" ELSE {first}"
                lines += rest
            return lines
        case ast.Try(body=body, catch=catch):
            lines = block("TRY", body)
            first, *rest = _block(catch, depth)
            lines[-1] += f" CATCH {first}"
            return lines + rest
        case ast.Parallel(body=body):
            return block("PARALLEL", body)
        case ast.EstimateCost(body=body):
            return block("ESTIMATE_COST", body)
        case ast.Option(label=label, body=body):
            return block(f"OPTION {quote(label)}", body)
        case ast.Choose(options=options):
            return block("CHOOSE", options)
    raise TypeError(f"not a statement: {node!r}")


def format_script(script: ast.Script) -> str:
    header = "#TISS!" if script.language is None else f"#TISS! Language={script.language}"
    return "\n".join([header, *(line for stmt in script.body for line in format_stmt(stmt))]) + "\n"

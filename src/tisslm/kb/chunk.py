"""Split a document into chunks that follow its structure, each pointing back at its source lines.

Retrieval is only as good as its units: a whole file buries the one function a question is about,
while fixed-size windows cut functions in half and carry no name. So Python is split by its syntax
tree (one chunk per function, method and class, plus the module docstring and the runs of top-level
code between definitions) and prose by heading and paragraph. Every chunk keeps a qualified name
(`json.decoder.JSONDecoder.raw_decode`) and its 1-based inclusive line span, so a hit can be cited
and opened at the right place.
"""

from __future__ import annotations

import ast
import hashlib
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

# Bumped whenever the chunking changes, so that re-indexing re-chunks every document.
# 2: chunks carry their definition's signature and docstring (searched as fields of their own).
CHUNKER_VERSION = 2
# Prose chunks grow paragraph by paragraph up to about this many characters (within one section).
PROSE_CHUNK_CHARS = 1500

ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.+?)\s*#*\s*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")


@dataclass(frozen=True)
class Chunk:
    """One retrievable unit: `text` is lines start_line..end_line (1-based, inclusive) of `path`."""

    path: str
    name: str
    kind: str  # module, code, class, function, section
    start_line: int
    end_line: int
    text: str
    signature: str = ""  # a def's or class's header lines (decorators to the colon); "" for others
    doc: str = ""  # its docstring (a module chunk: the module docstring); "" for others

    @property
    def sha256(self) -> str:
        return hashlib.sha256(f"{self.path}\0{self.name}\0{self.text}".encode()).hexdigest()


def module_name(path: str) -> str:
    """`json/decoder.py` -> `json.decoder`; `json/__init__.py` -> `json`; `README.md` -> `README`."""
    parts = list(PurePosixPath(path).with_suffix("").parts)
    if len(parts) > 1 and parts[-1] == "__init__":
        parts.pop()
    return ".".join(p for p in parts if p not in ("", "/", ".", "..")) or path


def _lines(lines: list[str], start: int, end: int) -> str:
    return "".join(lines[start - 1 : end]).rstrip("\n")


def _first_line(node: ast.stmt) -> int:
    """A definition starts at its first decorator, which belongs to it."""
    decorators = getattr(node, "decorator_list", [])
    return min([node.lineno, *(d.lineno for d in decorators)])


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _signature_and_doc(
    lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
) -> tuple[str, str]:
    """The header lines of a definition (first decorator to the line before its body) and its docstring."""
    start = _first_line(node)
    end = max(node.lineno, node.body[0].lineno - 1) if node.body else node.lineno
    return _lines(lines, start, end), ast.get_docstring(node, clean=True) or ""


def _scope_chunks(
    path: str,
    lines: list[str],
    body: list[ast.stmt],
    scope: str,
    kind: str,
    header: int | None,
    header_fields: tuple[str, str] = ("", ""),
) -> list[Chunk]:
    """Chunks of one scope (a module or a class body): each def or class is its own chunk (classes
    recursively), and each run of other statements between them one chunk named after the scope.
    A class's first run starts at its `class` line (`header`), so the chunk holds its signature and
    docstring; nested functions stay inside the function that defines them."""
    chunks: list[Chunk] = []
    run: list[ast.stmt] = []
    run_start = header
    # A class's header run carries the class's signature and docstring (set by the caller).
    signature, doc = ("", "") if header is None else header_fields

    def flush() -> None:
        nonlocal run, run_start, signature, doc
        if run:
            start = run_start if run_start is not None else _first_line(run[0])
            end = run[-1].end_lineno
            chunks.append(Chunk(path, scope, kind, start, end, _lines(lines, start, end), signature, doc))
        elif run_start is not None:  # a class whose body starts with a method: its header line(s) alone
            end = _first_line(body[0]) - 1 if body else run_start
            text = _lines(lines, run_start, end)
            chunks.append(Chunk(path, scope, kind, run_start, max(run_start, end), text, signature, doc))
        run, run_start, signature, doc = [], None, "", ""

    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            flush()
            name, start = f"{scope}.{node.name}", _first_line(node)
            fields = _signature_and_doc(lines, node)
            if isinstance(node, ast.ClassDef):
                chunks.extend(_scope_chunks(path, lines, node.body, name, "class", start, fields))
            else:
                text = _lines(lines, start, node.end_lineno)
                chunks.append(Chunk(path, name, "function", start, node.end_lineno, text, *fields))
        else:
            run.append(node)
    flush()
    return chunks


def chunk_python(path: str, text: str) -> list[Chunk]:
    """The module docstring, every function, method and class, and the top-level code between them.

    Raises SyntaxError for text that is not Python (the caller falls back to prose chunking).
    """
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    module = module_name(path)
    body, chunks = tree.body, []
    if body and _is_docstring(body[0]):
        doc = body[0]
        text = _lines(lines, doc.lineno, doc.end_lineno)
        docstring = ast.get_docstring(tree, clean=True) or ""
        chunks.append(Chunk(path, module, "module", doc.lineno, doc.end_lineno, text, "", docstring))
        body = body[1:]
    chunks += _scope_chunks(path, lines, body, module, "code", None)
    return [c for c in chunks if c.text.strip()]


def _sections(lines: list[str]) -> list[tuple[str, int, int]]:
    """(heading trail, first line, last line) of each section; headings outside code fences only."""
    sections, trail, start, in_fence = [], [], 1, False
    for number, line in enumerate(lines, start=1):
        if FENCE.match(line):
            in_fence = not in_fence
        if in_fence:
            continue
        level, title = None, None
        if m := ATX_HEADING.match(line):
            level, title = len(m.group(1)), m.group(2)
        elif (
            number < len(lines)
            and line.strip()
            and SETEXT_UNDERLINE.match(lines[number])
            and not SETEXT_UNDERLINE.match(line)
        ):
            level, title = (1 if lines[number].strip()[0] == "=" else 2), line.strip()
        if level is None:
            continue
        if number > start:
            sections.append((" > ".join(t for _, t in trail), start, number - 1))
        trail = [(lv, t) for lv, t in trail if lv < level] + [(level, title)]
        start = number
    sections.append((" > ".join(t for _, t in trail), start, len(lines)))
    return sections


def _paragraphs(lines: list[str], start: int, end: int) -> list[tuple[int, int]]:
    """Line spans of the blank-line separated paragraphs in start..end (a code fence is one paragraph)."""
    spans, first, in_fence = [], None, False
    for number in range(start, end + 1):
        line = lines[number - 1]
        if FENCE.match(line):
            in_fence = not in_fence
        if line.strip() or in_fence:
            first = number if first is None else first
            last = number
        elif first is not None:
            spans.append((first, last))
            first = None
    if first is not None:
        spans.append((first, last))
    return spans


def chunk_prose(path: str, text: str) -> list[Chunk]:
    """Markdown, reST and plain text: sections by heading, each cut at paragraph breaks into chunks
    of about PROSE_CHUNK_CHARS. A chunk is named by its heading trail (`Install > From source`)."""
    lines = text.splitlines(keepends=True)
    title = PurePosixPath(path).name
    chunks = []
    for trail, start, end in _sections(lines):
        name = f"{title} > {trail}" if trail else title
        group: list[tuple[int, int]] = []
        size = 0
        for first, last in _paragraphs(lines, start, end):
            length = sum(len(line) for line in lines[first - 1 : last])
            if group and size + length > PROSE_CHUNK_CHARS:
                chunks.append(
                    Chunk(path, name, "section", group[0][0], group[-1][1], _lines(lines, group[0][0], group[-1][1]))
                )
                group, size = [], 0
            group.append((first, last))
            size += length
        if group:
            chunks.append(
                Chunk(path, name, "section", group[0][0], group[-1][1], _lines(lines, group[0][0], group[-1][1]))
            )
    return chunks


def chunk_document(path: str, text: str) -> list[Chunk]:
    """Chunks of any text document: by syntax for Python that parses, by heading and paragraph otherwise."""
    if path.endswith((".py", ".pyi")):
        try:
            return chunk_python(path, text)
        except (SyntaxError, ValueError):  # Python 2 files, templates; ValueError: null bytes
            pass
    return chunk_prose(path, text)

"""Instruction data: conversations to fine-tune on, from a JSONL file or made from the corpus itself.

The default set needs nothing beyond the corpus: every documented top-level function of a clean
document becomes one exchange, "Write a Python function `name(args)`: <its docstring's summary>"
answered by the function's source. Functions come from the documents of each split as
train/val split them, so the held-out examples were never trained on, not even as plain text.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from tisslm.core.chat import validate_messages
from tisslm.core.errors import TissLMError
from tisslm.core.io import read_jsonl
from tisslm.data.shards import read_shards
from tisslm.data.tokens import is_val

MAX_SOLUTION_CHARS = 1200  # about 350 tokens of code: longer functions rarely fit a short context
MIN_SUMMARY_WORDS = 4  # "Helper." teaches nothing


@dataclass(frozen=True)
class FunctionExample:
    """One documented function as an instruction and its answer."""

    doc_id: str
    name: str
    instruction: str  # what the user asks
    solution: str  # the function's source, docstring included: the answer
    imports: str  # the document's top-level imports, which the solution and its doctests may need
    doctest: str | None  # the docstring, when it carries `>>>` examples

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.instruction}, {"role": "assistant", "content": self.solution}]


def _summary(docstring: str) -> str | None:
    """The docstring's first paragraph on one line, if it says enough."""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    return paragraph if len(paragraph.split()) >= MIN_SUMMARY_WORDS else None


def functions_of(doc_id: str, text: str, max_solution_chars: int = MAX_SOLUTION_CHARS) -> list[FunctionExample]:
    """The documented, public, undecorated top-level functions of one Python document."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []  # not Python, or Python this interpreter cannot parse
    lines = text.splitlines(keepends=True)

    def source(node: ast.stmt) -> str:
        # Whole lines, sliced once: ast.get_source_segment re-splits the text on every call.
        return "".join(lines[node.lineno - 1 : node.end_lineno]).rstrip()

    imports = "\n".join(source(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)))
    examples = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        docstring = ast.get_docstring(node)
        summary = _summary(docstring) if docstring and not node.decorator_list else None
        solution = source(node)
        if summary is None or len(solution) > max_solution_chars:
            continue
        signature = f"{node.name}({ast.unparse(node.args)})"
        examples.append(
            FunctionExample(
                doc_id=doc_id,
                name=node.name,
                instruction=f"Write a Python function `{signature}`: {summary}",
                solution=solution,
                imports=imports,
                doctest=docstring if ">>>" in docstring else None,
            )
        )
    return examples


def function_examples(
    clean_dir: str | Path, val_fraction: float, split: str, limit: int | None = None
) -> list[FunctionExample]:
    """The default instruction set of one split ("train" or "val") of data/clean, in table order,
    each distinct function source once; the first `limit` of them."""
    if split not in ("train", "val"):
        raise TissLMError(f"split={split!r}: expected 'train' or 'val'")
    table = read_shards(clean_dir)
    examples: list[FunctionExample] = []
    seen: set[str] = set()
    for doc_id, text, train_only in zip(table["id"], table["text"], table["train_only"], strict=True):
        if (split == "val") != is_val(doc_id, val_fraction, train_only):
            continue
        for example in functions_of(doc_id, text):
            if example.solution not in seen:
                seen.add(example.solution)
                examples.append(example)
                if limit is not None and len(examples) >= limit:
                    return examples
    return examples


def read_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """A JSONL file of {"messages": [...]} records; a bad line is a one-line error naming it."""
    conversations = []
    for where, record in read_jsonl(path):
        if not isinstance(record, dict) or "messages" not in record:
            raise TissLMError(f'{where}: expected an object with "messages"')
        messages = validate_messages(record["messages"], where)
        if not any(m["role"] == "assistant" for m in messages):
            raise TissLMError(f"{where}: the conversation has no assistant message to learn from")
        conversations.append(messages)
    if not conversations:
        raise TissLMError(f"{path}: no conversations")
    return conversations

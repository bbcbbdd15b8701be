"""The default instruction set made from the corpus, and user conversations read from JSONL."""

from __future__ import annotations

import ast
import json

import datasets
import pytest

from tisslm.core.errors import TissLMError
from tisslm.data.instructions import function_examples, functions_of, read_conversations
from tisslm.data.shards import text_sha256, write_shards
from tisslm.data.tokens import is_val

DOCUMENT = '''"""A module."""
import os
from math import sqrt as root


def hypotenuse(a, b=1.0, *, exact=False):
    """Return the length of the longest side of a right triangle.

    More words that are not part of the summary.

    >>> hypotenuse(3, 4)
    5.0
    """
    return root(a * a + b * b)


def join(*parts):
    """Join path parts with the separator of this system."""
    return os.sep.join(parts)


def _private(x):
    """A private helper that is documented all the same."""
    return x


@staticmethod
def decorated(x):
    """A decorated function whose source would need its decorator."""
    return x


def terse(x):
    """Helper."""
    return x


def undocumented(x):
    return x


class Box:
    def method(self):
        """A method, which needs its class to make sense."""
        return 1
'''


def write_clean(directory, ids, texts, train_only) -> None:
    """data/clean as the clean stage writes it (every column the shard reader checks)."""
    columns = {"id": ids, "source": ["dir"] * len(ids), "path": [f"{i}.py" for i in ids], "text": texts,
               "n_bytes": [len(t.encode()) for t in texts], "sha256": [text_sha256(t) for t in texts],
               "train_only": train_only}  # fmt: skip
    write_shards(datasets.Dataset.from_dict(columns), directory, shard_rows=16)


def test_documented_public_top_level_functions_become_examples():
    examples = functions_of("doc-1", DOCUMENT)
    assert [e.name for e in examples] == ["hypotenuse", "join"]
    first = examples[0]
    assert first.instruction == (
        "Write a Python function `hypotenuse(a, b=1.0, *, exact=False)`: "
        "Return the length of the longest side of a right triangle."
    )
    assert first.solution.startswith("def hypotenuse(") and first.solution.endswith("return root(a * a + b * b)")
    assert ast.parse(first.solution).body[0].name == "hypotenuse"
    assert first.imports == "import os\nfrom math import sqrt as root"
    assert ">>> hypotenuse(3, 4)" in first.doctest and examples[1].doctest is None
    assert first.messages == [
        {"role": "user", "content": first.instruction},
        {"role": "assistant", "content": first.solution},
    ]


def test_long_functions_and_unparsable_documents_give_nothing():
    assert functions_of("d", DOCUMENT, max_solution_chars=50) == []
    assert functions_of("d", "def broken(:\n") == []
    assert functions_of("d", "plain text, not Python") == []


def test_examples_follow_the_train_val_split_of_documents(tmp_path):
    ids = [f"doc-{i}" for i in range(40)]
    texts = [DOCUMENT.replace("hypotenuse", f"hypotenuse_{i}").replace("join", f"join_{i}") for i in range(40)]
    train_only = [i % 10 == 0 for i in range(40)]
    write_clean(tmp_path / "clean", ids, texts, train_only)
    val_fraction = 0.3
    train = function_examples(tmp_path / "clean", val_fraction, "train")
    val = function_examples(tmp_path / "clean", val_fraction, "val")
    expected_val = {d for d, only in zip(ids, train_only, strict=True) if is_val(d, val_fraction, only)}
    assert {e.doc_id for e in val} == expected_val and val  # the hash split puts some documents in val
    assert {e.doc_id for e in train} == set(ids) - expected_val
    assert len(train) + len(val) == 2 * len(ids)
    assert function_examples(tmp_path / "clean", val_fraction, "train", limit=3) == train[:3]
    with pytest.raises(TissLMError, match="split='test'"):
        function_examples(tmp_path / "clean", val_fraction, "test")


def test_identical_functions_are_kept_once(tmp_path):
    write_clean(tmp_path / "clean", ["a", "b"], [DOCUMENT, DOCUMENT], [True, True])
    assert [e.doc_id for e in function_examples(tmp_path / "clean", 0.5, "train")] == ["a", "a"]


def test_conversations_read_from_jsonl(tmp_path):
    path = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello."}]}  # fmt: skip
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    assert read_conversations(path) == [good["messages"], good["messages"]]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("{not json", r"chats.jsonl:2: invalid JSON"),
        ('{"text": "hi"}', r'chats.jsonl:2: expected an object with "messages"'),
        ('{"messages": []}', r"chats.jsonl:2: messages must be a non-empty list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', r"chats.jsonl:2: messages\[0\].role='robot'"),
        ('{"messages": [{"role": "user", "content": 3}]}', r"chats.jsonl:2: messages\[0\].content must be a string"),
        ('{"messages": [{"role": "user", "content": "x"}]}', r"chats.jsonl:2: the conversation has no assistant"),
    ],
)
def test_a_bad_conversation_line_is_named(tmp_path, line, error):
    path = tmp_path / "chats.jsonl"
    ok = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'
    path.write_text(ok + "\n" + line + "\n")
    with pytest.raises(TissLMError, match=error):
        read_conversations(path)


def test_an_empty_or_missing_file_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TissLMError, match="no conversations"):
        read_conversations(tmp_path / "empty.jsonl")
    with pytest.raises(TissLMError, match=r"missing\.jsonl: unreadable"):
        read_conversations(tmp_path / "missing.jsonl")

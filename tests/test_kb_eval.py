"""The retrieval query set is sound for this Python, and the evaluations run end to end."""

from __future__ import annotations

import json
import math
import re
import sysconfig
from pathlib import Path

import pytest
from conftest import make_model

from tisslm.core.errors import TissLMError
from tisslm.core.tokenizer import byte_level_tokenizer
from tisslm.kb import KnowledgeBase, build_index
from tisslm.kb.chunk import chunk_document, module_name
from tisslm.kb.evaluate import DEFAULT_QUERIES, context_gain, evaluate_retrieval, load_queries

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def mentions_module(query: dict) -> bool:
    """Does the question name its module (any dotted part of it, or that part without a plural s)?"""
    words = set(re.findall(r"\w+", query["query"].lower()))
    parts = {p.lower() for path in query["files"] for p in module_name(path).split(".")}
    return any(p.lstrip("_") in words or p.rstrip("s") in words for p in parts)


def test_the_query_set_labels_exist_in_this_stdlib():
    queries = load_queries(DEFAULT_QUERIES)
    assert len(queries) >= 60 and len({q["id"] for q in queries}) == len(queries)
    assert sum(not mentions_module(q) for q in queries) >= len(queries) / 2
    assert all(q["mentions_module"] == mentions_module(q) for q in queries)
    chunks = {}
    for q in queries:
        for path in q["files"]:
            if path not in chunks:
                chunks[path] = {c.name for c in chunk_document(path, (STDLIB / path).read_text(encoding="utf-8"))}
        for name in q["names"]:
            assert any(name in chunks[path] for path in q["files"]), (q["id"], name)


@pytest.fixture(scope="module")
def small_stdlib_kb(tmp_path_factory) -> tuple[Path, Path]:
    """An index of a few stdlib modules and a query file of their queries plus one unanswerable."""
    wanted = ["shlex.py", "textwrap.py", "fnmatch.py", "bisect.py", "heapq.py"]
    queries = [q for q in load_queries(DEFAULT_QUERIES) if set(q["files"]) & set(wanted)]
    queries.append({"id": "unanswerable", "query": "parse a URL", "files": ["urllib/parse.py"],
                    "names": ["urllib.parse.urlparse"]})  # fmt: skip
    out = tmp_path_factory.mktemp("kb")
    build_index(out, files=[], directory=STDLIB, include=wanted, progress=False)
    path = out.parent / "queries.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in queries))
    return out, path


def test_evaluate_retrieval_reports_every_mode_and_the_baseline(small_stdlib_kb):
    kb_dir, queries = small_stdlib_kb
    report = evaluate_retrieval(kb_dir, queries)
    assert report["answerable"] == report["queries"] - 1 >= 8
    assert set(report["results"]) == {"fused", "bm25", "dense", "whole_file_bm25"}
    for mode, result in report["results"].items():
        assert set(result["file"]) == {"recall@5", "mrr@10", "ndcg@10"}
        assert all(0 <= v <= 1 for v in [*result["file"].values(), *result["graded"].values()]), mode
    assert report["results"]["whole_file_bm25"]["graded"]["function_mrr@10"] == 0  # a file is never a function
    assert report["results"]["bm25"]["file"]["mrr@10"] > 0.5
    (queries.parent / "bad.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(TissLMError, match=r"bad\.jsonl:1: a query needs"):
        evaluate_retrieval(kb_dir, queries.parent / "bad.jsonl")
    # A corpus the query set is not about (a user's own code): nothing answerable, reported, no error.
    (queries.parent / "elsewhere.jsonl").write_text(json.dumps({"id": "u", "query": "parse a URL",
        "files": ["urllib/parse.py"], "names": ["urllib.parse.urlparse"]}) + "\n")  # fmt: skip
    assert evaluate_retrieval(kb_dir, queries.parent / "elsewhere.jsonl") == {
        "queries": 1,
        "answerable": 0,
        "without_module_name": 0,
        "results": {},
    }


def test_context_gain_scores_the_same_bytes_with_and_without_context(small_stdlib_kb):
    kb_dir, _ = small_stdlib_kb
    tokenizer = byte_level_tokenizer()
    model = make_model(vocab_size=tokenizer.get_vocab_size(), max_seq_len=256)
    val = ['def quote(s):\n    return "\'" + s + "\'"\n', "def dedent(text):\n    return text\n"]
    with KnowledgeBase.open(kb_dir) as kb:
        gain = context_gain(model, tokenizer, kb, val, window=256, max_documents=2, k=3)
    assert gain["documents"] == 2 and gain["bytes"] == sum(len(t) for t in val)
    assert 0 < gain["mean_context_tokens"] <= 128 + 1 and gain["mean_chunks_used"] >= 1
    assert math.isfinite(gain["bits_per_byte_without"]) and math.isfinite(gain["bits_per_byte_with_context"])
    assert gain["gain_bits_per_byte"] == pytest.approx(
        gain["bits_per_byte_without"] - gain["bits_per_byte_with_context"], abs=2e-4
    )

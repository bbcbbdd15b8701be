"""How good is retrieval, and does retrieved context help the model?

Retrieval is measured on questions about the standard library's code (queries.jsonl beside this
module; queries.md says how they were written), each labelled with its relevant file(s) and
qualified function or class names. Two definitions of relevance, both reported:

- file: rankings are collapsed to files (the first hit from each file, in rank order) and a file
  is relevant if a query names it. Every run, the whole-file baseline included, is a ranking of
  files, so this is the like-for-like comparison.
- graded: a hit is worth 2 when it is a relevant function (its qualified name is labelled), 1 when
  it is another part of a relevant file, 0 otherwise; each (function or file) counts once. A whole
  file can be worth at most 1: it is the right place, but the reader must still find the function.

Measures (ir-measures, which wraps trec_eval): R@5, RR@10 (MRR@10 over queries) and nDCG@10,
plus for graded the function-level R(rel=2)@5 and RR(rel=2)@10. The baseline is BM25 over whole
files: the same FTS5 tokenizer and query over each document's chunks joined into one text.

A query is answerable when one of its files is in the index (the pipeline indexes only the train
split, so a file in the val split leaves its queries without a relevant document); only
answerable queries are scored, and the counts are reported.
"""

from __future__ import annotations

import math
import sqlite3
import sysconfig
import time
from collections.abc import Sequence
from importlib.resources import files as package_files
from pathlib import Path

import ir_measures
from ir_measures import Qrel, ScoredDoc
from tokenizers import Tokenizer

from tisslm.core.choices import SEARCH_MODES
from tisslm.core.errors import TissLMError
from tisslm.core.io import read_jsonl
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import END_OF_TEXT
from tisslm.data.ingest import STDLIB_EXCLUDED_DIRS, STDLIB_TEST_DIRS
from tisslm.eval.evaluate import document_loglikelihoods, perplexity_metrics
from tisslm.kb.chunk import module_name
from tisslm.kb.context import with_context
from tisslm.kb.index import KnowledgeBase, Ranking, fts_query
from tisslm.kb.store import TOKENIZE, identifier_terms

DEFAULT_QUERIES = Path(str(package_files("tisslm.kb") / "queries.jsonl"))
# Written by someone blind to the ranking while its last round began, complete before any choice
# in it was made, and never tuned on (queries.md): the check on overfitting.
HELDOUT_QUERIES = Path(str(package_files("tisslm.kb") / "queries_heldout.jsonl"))
# The whole-file baseline's bm25() weights of (name, text, terms), as the first index had them.
BASELINE_WEIGHTS = (4.0, 1.0, 1.0)
# The corpus the queries are about, as build_index arguments: this Python's standard library
# source without its tests and site-packages (the ingest stage's `stdlib` source, part code).
STDLIB_SOURCE = {
    "directory": Path(sysconfig.get_paths()["stdlib"]),
    "include": ["**/*.py"],
    "exclude": [f"{name}/" for name in sorted(STDLIB_EXCLUDED_DIRS | STDLIB_TEST_DIRS)],
}
DEPTH = 10  # rankings are scored to rank 10
CANDIDATES = 50  # chunks retrieved per query before collapsing them to files
FILE_MEASURES = {"recall@5": "R@5", "mrr@10": "RR@10", "ndcg@10": "nDCG@10"}
GRADED_MEASURES = FILE_MEASURES | {"function_recall@5": "R(rel=2)@5", "function_mrr@10": "RR(rel=2)@10"}


def load_queries(path: Path) -> list[dict]:
    """The query set: one JSON object a line with id, query, files and names (qualified)."""
    queries = []
    for where, query in read_jsonl(path):
        if not isinstance(query, dict) or not {"id", "query", "files", "names"} <= query.keys():
            raise TissLMError(f"{where}: a query needs id, query, files and names")
        queries.append(query)
    return queries


def _first_per_key(keys: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(keys))[:DEPTH]


def _graded_docs(query: dict, hits: Sequence[tuple[str, str, int]]) -> list[str]:
    """(path, name, start_line) of each hit -> the graded run's doc ids (see the module docstring)."""
    names, paths = set(query["names"]), set(query["files"])
    keys = []
    for path, name, start in hits:
        if name in names and path in paths:
            keys.append(f"fn:{name}")
        elif path in paths:
            keys.append(f"file:{path}")
        else:
            keys.append(f"other:{path}:{name}:{start}")
    return _first_per_key(keys)


def _qrels(queries: Sequence[dict]) -> tuple[list[Qrel], list[Qrel]]:
    file_qrels = [Qrel(q["id"], path, 1) for q in queries for path in q["files"]]
    graded = [Qrel(q["id"], f"fn:{name}", 2) for q in queries for name in q["names"]]
    graded += [Qrel(q["id"], f"file:{path}", 1) for q in queries for path in q["files"]]
    return file_qrels, graded


def _scored(runs: dict[str, list[str]]) -> list[ScoredDoc]:
    return [ScoredDoc(qid, doc, float(DEPTH - rank)) for qid, docs in runs.items() for rank, doc in enumerate(docs)]


def _measure(qrels: list[Qrel], runs: dict[str, list[str]], measures: dict[str, str]) -> dict[str, float]:
    parsed = {name: ir_measures.parse_measure(m) for name, m in measures.items()}
    values = ir_measures.calc_aggregate(list(parsed.values()), qrels, _scored(runs))
    # trec_eval averages over the queries that have a ranking; a query with no hits scores 0.
    share = len([q for q, docs in runs.items() if docs]) / max(1, len(runs))
    return {name: round(values.get(m, 0.0) * share, 4) for name, m in parsed.items()}


def whole_file_rankings(documents: Sequence[tuple[str, str]], queries: Sequence[dict]) -> dict[str, list[str]]:
    """BM25 over whole files (one row per document, same tokenizer and query as the chunk index):
    the baseline a chunked index has to beat. Returns query id -> file paths, best first."""
    db = sqlite3.connect(":memory:")
    db.execute(f'CREATE VIRTUAL TABLE files USING fts5(path UNINDEXED, name, text, terms, tokenize="{TOKENIZE}")')
    db.executemany(
        "INSERT INTO files VALUES (?, ?, ?, ?)",
        [(path, module_name(path), text, identifier_terms(text)) for path, text in documents],
    )
    rankings = {}
    for query in queries:
        match = fts_query(query["query"])
        rows = [] if match is None else db.execute(
            "SELECT path FROM files WHERE files MATCH ? ORDER BY bm25(files, ?, ?, ?) LIMIT ?",
            (match, *BASELINE_WEIGHTS, DEPTH),
        ).fetchall()  # fmt: skip
        rankings[query["id"]] = [path for (path,) in rows]
    db.close()
    return rankings


def evaluate_retrieval(
    kb_dir: Path,
    queries_path: Path = DEFAULT_QUERIES,
    modes: Sequence[str] = SEARCH_MODES,
    ranking: Ranking | None = None,
    baseline: bool = True,
) -> dict:
    """Retrieval quality of the index in `kb_dir` on the query set: file-level and graded R@5,
    MRR@10 and nDCG@10 for each mode (with `ranking`, default the index's default) and the
    whole-file BM25 baseline (unless `baseline` is false), over answerable queries."""
    queries = load_queries(queries_path)
    with KnowledgeBase.open(Path(kb_dir)) as kb:
        indexed = kb.document_paths()
        answerable = [q for q in queries if indexed & set(q["files"])]
        if not answerable:  # a corpus the query set is not about: nothing to measure, which is no error
            return {"queries": len(queries), "answerable": 0, "without_module_name": 0, "results": {}}
        file_qrels, graded_qrels = _qrels(answerable)
        results: dict[str, dict] = {}
        for mode in modes:
            started = time.perf_counter()
            hits = {q["id"]: kb.search(q["query"], k=CANDIDATES, mode=mode, ranking=ranking) for q in answerable}
            seconds = time.perf_counter() - started
            file_runs = {qid: _first_per_key([h.path for h in hs]) for qid, hs in hits.items()}
            graded_runs = {
                q["id"]: _graded_docs(q, [(h.path, h.name, h.start_line) for h in hits[q["id"]]]) for q in answerable
            }
            results[mode] = {
                "file": _measure(file_qrels, file_runs, FILE_MEASURES),
                "graded": _measure(graded_qrels, graded_runs, GRADED_MEASURES),
                "ms_per_query": round(1000 * seconds / len(answerable), 2),
            }
        files = whole_file_rankings(kb.documents(), answerable) if baseline else None
    if files is not None:
        results["whole_file_bm25"] = {
            "file": _measure(file_qrels, files, FILE_MEASURES),
            "graded": _measure(
                graded_qrels, {qid: [f"file:{p}" for p in ps] for qid, ps in files.items()}, GRADED_MEASURES
            ),
        }
    return {
        "queries": len(queries),
        "answerable": len(answerable),
        "without_module_name": sum(not q.get("mentions_module", True) for q in answerable),
        "candidates_per_query": CANDIDATES,
        "relevance": "file: rankings collapsed to files, relevant file = 1; graded: relevant function 2, "
        "other chunk of a relevant file 1",
        "results": results,
    }


def context_gain(
    model: TissLM,
    tokenizer: Tokenizer,
    kb: KnowledgeBase,
    val_texts: Sequence[str],
    window: int,
    max_documents: int = 32,
    context_tokens: int | None = None,
    k: int = 8,
    query_chars: int = 1000,
    mode: str = "fused",
    batch_size: int = 8,
) -> dict:
    """Bits per byte of held-out documents with retrieved context and without, same window.

    Without: lm-evaluation-harness's rolling windows of `window` tokens, the first conditioned on
    <|endoftext|> (the evaluate stage's own scoring). With: the first window starts with up to
    `context_tokens` (default window // 2) tokens of chunks retrieved from the index (built on the
    train split) for the document's first `query_chars` characters, then <|endoftext|>, then the
    document, as documents are packed in training. The document's log-likelihood with context is
    loglik(context + document) - loglik(context), which scores exactly the document's tokens, so
    both figures cover the same bytes and every window holds at most `window` tokens.
    """
    end = tokenizer.token_to_id(END_OF_TEXT)
    if end is None:
        raise TissLMError(f"the tokenizer has no {END_OF_TEXT!r} token")
    budget = window // 2 if context_tokens is None else context_tokens
    texts = [t for t in val_texts if t.strip()][:max_documents]
    if not texts:
        raise TissLMError("context_gain: no non-empty held-out documents")
    documents = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    contexts, used = [], 0
    for text in texts:
        grounded = with_context("", kb.search(text[:query_chars], k=k, mode=mode), tokenizer, budget)
        used += len(grounded.sources)
        contexts.append([*tokenizer.encode(grounded.text, add_special_tokens=False).ids, end])
    plain = document_loglikelihoods(model, documents, end, window, batch_size)
    with_ctx = document_loglikelihoods(
        model, [c + d for c, d in zip(contexts, documents, strict=True)], end, window, batch_size
    )
    ctx_only = document_loglikelihoods(model, contexts, end, window, batch_size)
    conditioned = [a - b for a, b in zip(with_ctx, ctx_only, strict=True)]
    n_tokens = sum(len(d) for d in documents)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    without = perplexity_metrics(plain, n_tokens, n_bytes)["bits_per_byte"]
    with_context_bpb = perplexity_metrics(conditioned, n_tokens, n_bytes)["bits_per_byte"]
    return {
        "documents": len(texts),
        "bytes": n_bytes,
        "window": window,
        "context_tokens_budget": budget,
        "mean_context_tokens": round(sum(len(c) for c in contexts) / len(contexts), 1),
        "mean_chunks_used": round(used / len(texts), 2),
        "bits_per_byte_without": round(without, 4),
        "bits_per_byte_with_context": round(with_context_bpb, 4),
        "gain_bits_per_byte": round(without - with_context_bpb, 4),
        "relative_gain": round((without - with_context_bpb) / without, 4)
        if math.isfinite(without) and without
        else 0.0,
    }

"""Knowledge-base benchmarks: writes benchmarks/results/kb.json.

- the default corpus (this Python's standard library, all of it, no train/val split): indexing
  MB/s, a no-change re-index, and retrieval quality on the shipped query set (bm25, dense, fused
  and the whole-file BM25 baseline; see tisslm.kb.evaluate for the relevance definitions);
- query latency p50/p99 per mode at 10k and 100k chunks of synthetic code (sizes the stdlib cannot
  reach), with bm25s on the same chunks and queries as the speed anchor (a sparse-matrix BM25 in
  numpy/scipy: fast, but in memory and without incremental updates or a dense side).

Run from the repository root: python benchmarks/bench_kb.py   (about 5 minutes on 2 cores)
"""

from __future__ import annotations

import itertools
import keyword
import os
import platform
import random
import sqlite3
import tempfile
import time
from pathlib import Path

import bm25s
import numpy as np

from tisslm.core.io import atomic_write_json
from tisslm.kb import KnowledgeBase, build_index
from tisslm.kb.evaluate import STDLIB_SOURCE, evaluate_retrieval

RESULTS = Path(__file__).parent / "results" / "kb.json"
SCALES = (10_000, 100_000)
FUNCTIONS_PER_FILE = 20
N_QUERIES = 200
VOCABULARY = [
    word
    for i in range(20_000)
    if not keyword.iskeyword(
        word := "".join(random.Random(i).choices("abcdefghijklmnopqrstuvwxyz", k=random.Random(-i).randint(3, 10)))
    )
]  # no keywords, so that every synthetic file parses and chunks into exactly its functions


ZIPF_WEIGHTS = list(itertools.accumulate(1 / rank for rank in range(1, len(VOCABULARY) + 1)))


def zipf_words(rng: random.Random, n: int) -> list[str]:
    """Words drawn by Zipf's law (frequency ~ 1 / rank), as in natural text and code identifiers:
    the commonest word is ~10% of all words and sits in nearly every chunk, most words are rare."""
    return rng.choices(VOCABULARY, cum_weights=ZIPF_WEIGHTS, k=n)


def synthetic_function(rng: random.Random, index: int) -> str:
    name = "_".join(zipf_words(rng, 2))
    doc = " ".join(zipf_words(rng, 10))
    body = "\n".join(
        f"    {a} = {b}({c}, {d})" for a, b, c, d in (zipf_words(rng, 4) for _ in range(rng.randint(2, 8)))
    )
    return f'def {name}_{index}(x):\n    """{doc}."""\n{body}\n    return x\n'


def write_synthetic_corpus(root: Path, n_chunks: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    for f in range(n_chunks // FUNCTIONS_PER_FILE):
        functions = [synthetic_function(rng, f * FUNCTIONS_PER_FILE + i) for i in range(FUNCTIONS_PER_FILE)]
        (root / f"m{f:05d}.py").write_text("\n\n".join(functions))


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def latency(search, queries: list[str]) -> dict[str, float]:
    search(queries[0])  # warm: caches, the vector matrix, the embedding model
    times = []
    for query in queries:
        start = time.perf_counter()
        search(query)
        times.append(time.perf_counter() - start)
    return percentiles(times)


def scale_benchmark(n_chunks: int, workdir: Path) -> dict:
    corpus, out = workdir / f"corpus-{n_chunks}", workdir / f"kb-{n_chunks}"
    corpus.mkdir()
    write_synthetic_corpus(corpus, n_chunks)
    report = build_index(out, directory=corpus, include=["*.py"], progress=False)
    megabytes = report["bytes_read"] / 1e6
    rng = random.Random(1)
    queries = [" ".join(zipf_words(rng, rng.randint(2, 6))) for _ in range(N_QUERIES)]
    result = {
        "chunks": report["chunks"],
        "megabytes": round(megabytes, 2),
        "index_seconds": report["seconds"],
        "index_mb_per_s": round(megabytes / report["seconds"], 3),
        "index_bytes": (out / "index.sqlite").stat().st_size,
        "tisslm": {},
    }
    with KnowledgeBase.open(out) as kb:
        for mode in ("bm25", "dense", "fused"):
            result["tisslm"][mode] = latency(lambda q, mode=mode: kb.search(q, k=10, mode=mode), queries)
    with sqlite3.connect(out / "index.sqlite") as db:
        texts = [f"{name}\n{text}" for name, text in db.execute("SELECT name, text FROM chunks ORDER BY id")]
    start = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    result["bm25s"] = {"index_seconds": round(time.perf_counter() - start, 2)}

    def bm25s_search(query: str) -> None:
        retriever.retrieve(bm25s.tokenize([query], stopwords="en", show_progress=False), k=10, show_progress=False)

    result["bm25s"] |= latency(bm25s_search, queries)
    return result


def main() -> None:
    print("indexing the standard library ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stdlib-kb"
        first = build_index(out, **STDLIB_SOURCE, progress=False)
        again = build_index(out, **STDLIB_SOURCE, progress=False)
        print("evaluating retrieval ...", flush=True)
        evaluation = evaluate_retrieval(out)
        stdlib = {
            "documents": first["documents"],
            "chunks": first["chunks"],
            "megabytes": round(first["bytes_read"] / 1e6, 2),
            "skipped": first["skipped"],
            "redactions": first["redactions"],
            "index_seconds": first["seconds"],
            "index_mb_per_s": round(first["bytes_read"] / 1e6 / first["seconds"], 3),
            "unchanged_reindex_seconds": again["seconds"],
            "index_bytes": (out / "index.sqlite").stat().st_size,
        }
        scales = {}
        for n_chunks in SCALES:
            print(f"{n_chunks} synthetic chunks ...", flush=True)
            scales[str(n_chunks)] = scale_benchmark(n_chunks, Path(tmp))
    fused_100k = scales[str(SCALES[-1])]["tisslm"]["fused"]["p50_ms"]
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "bm25s": bm25s.__version__,
        },
        "stdlib": stdlib,
        "retrieval": evaluation,
        "latency": scales,
        "goal_fused_p50_under_20_ms_at_100k": fused_100k <= 20,
        "goal_fused_beats_whole_file_mrr_ndcg": all(
            evaluation["results"]["fused"]["file"][m] > evaluation["results"]["whole_file_bm25"]["file"][m]
            for m in ("mrr@10", "ndcg@10")
        ),
    }
    atomic_write_json(RESULTS, report)
    for mode, r in evaluation["results"].items():
        print(f"{mode:>16}: file {r['file']}  graded {r['graded']}")
    for n, s in scales.items():
        print(f"{n:>7} chunks: " + ", ".join(f"{m} p50 {v['p50_ms']} ms" for m, v in s["tisslm"].items()) +
              f"; bm25s p50 {s['bm25s']['p50_ms']} ms")  # fmt: skip
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

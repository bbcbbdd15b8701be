"""Fit the knowledge base's file reranker (index.Ranking.rerank_weights) on the project's query set.

For every answerable question of src/tisslm/kb/queries.jsonl, the index gives each file among the
fused candidates its RERANK_FEATURES (KnowledgeBase.rerank_features); a file is a positive when the
question names it. A logistic regression on the standardized features learns how much each counts;
its weights over the features' standard deviations are the weights of the raw features (a ranking
needs no intercept). Five-fold cross-validation by question says what to expect on questions the
fit did not see. The held-out set (queries_heldout.jsonl) is never read here.

    python tools/fit_kb_rerank.py INDEX_DIR    # e.g. an index of data/clean built by build_index

Writes benchmarks/results/kb_rerank_fit.json and prints the weights to put in Ranking.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from tisslm.core.io import atomic_write_json
from tisslm.kb import KnowledgeBase
from tisslm.kb.evaluate import DEFAULT_QUERIES, DEPTH, load_queries
from tisslm.kb.index import DEFAULT_RANKING, RERANK_FEATURES

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "kb_rerank_fit.json"
FOLDS = 5
SEED = 0


def reciprocal_rank(files: list[str], relevant: set[str]) -> float:
    rank = next((n for n, f in enumerate(files[:DEPTH], start=1) if f in relevant), None)
    return 1.0 / rank if rank else 0.0


def fit(questions: list[dict]) -> np.ndarray:
    """Raw-feature weights from a logistic regression on the standardized features."""
    x = np.array([row for q in questions for _, row in q["candidates"]])
    y = np.array([path in q["files"] for q in questions for path, _ in q["candidates"]])
    scale = x.std(0) + 1e-9
    model = LogisticRegression(max_iter=1000).fit((x - x.mean(0)) / scale, y)
    return model.coef_[0] / scale


def mrr(questions: list[dict], weights: np.ndarray | None) -> float:
    """MRR@10 of the candidates reordered by `weights` (None: the fused order)."""
    total = 0.0
    for q in questions:
        order = [path for path, _ in q["candidates"]]
        if weights is not None and order:
            scores = np.array([row for _, row in q["candidates"]]) @ weights
            order = [order[i] for i in np.argsort(-scores, kind="stable")]
        total += reciprocal_rank(order, set(q["files"]))
    return total / len(questions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("index", type=Path, help="a knowledge base directory (tisslm kb build --out DIR)")
    args = parser.parse_args()
    no_rerank = replace(DEFAULT_RANKING, rerank_weights=(0.0,) * len(RERANK_FEATURES))
    with KnowledgeBase.open(args.index) as kb:
        indexed = kb.document_paths()
        questions = [
            {"files": q["files"], "candidates": kb.rerank_features(q["query"], no_rerank)}
            for q in load_queries(DEFAULT_QUERIES)
            if indexed & set(q["files"])
        ]
    order = list(range(len(questions)))
    random.Random(SEED).shuffle(order)
    folds = [order[i::FOLDS] for i in range(FOLDS)]
    cross_validated = 0.0
    for held in folds:
        kept = set(held)
        weights = fit([questions[i] for i in order if i not in kept])
        cross_validated += mrr([questions[i] for i in held], weights) * len(held)
    weights = fit(questions)
    weights = weights / weights[0]  # the lexical feature's weight 1: only the ratios rank
    report = {
        "machine": {"python": platform.python_version()},
        "index": {"documents": len(indexed)},
        "questions": len(questions),
        "features": list(RERANK_FEATURES),
        "weights": {name: round(float(w), 3) for name, w in zip(RERANK_FEATURES, weights, strict=True)},
        "file_mrr@10": {
            "fused": round(mrr(questions, None), 4),
            f"reranked, {FOLDS}-fold cross-validated": round(cross_validated / len(questions), 4),
            "reranked, fit on all (in-sample)": round(mrr(questions, weights), 4),
        },
    }
    atomic_write_json(RESULTS, report)
    print(report["file_mrr@10"], file=sys.stderr)
    print("rerank_weights = (" + ", ".join(f"{w:.3f}" for w in weights) + ")")


if __name__ == "__main__":
    main()

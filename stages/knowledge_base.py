"""DVC stage `knowledge_base`: the train split of data/clean -> models/kb + metrics/kb.json.

The metrics: the index's size and build time; retrieval on the project's query set and on the
held-out query set (recall@5, MRR@10, nDCG@10 for BM25, dense, fused and whole-file BM25); and
whether retrieved context lowers the model's bits per byte on held-out documents, which is also
stored in the index so that the server and `generate --kb` warn when grounding is worse than none.
"""

from __future__ import annotations

from stages import stage_paths
from tisslm.core.config import load_params
from tisslm.core.errors import run_main
from tisslm.core.io import atomic_write_json
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import load_tokenizer
from tisslm.data.tokens import read_split
from tisslm.kb import KnowledgeBase, build_index
from tisslm.kb.build import record_grounding
from tisslm.kb.evaluate import context_gain, evaluate_retrieval
from tisslm.kb.index import Ranking


def main() -> None:
    paths = stage_paths(__doc__, ["clean", "model", "queries", "heldout_queries", "kb", "metrics"])
    params = load_params()
    val_fraction, window = params.tokenize.val_fraction, params.train.seq_len
    p = params.knowledge_base
    ranking = Ranking.from_json(p.ranking.model_dump())
    build = build_index(
        paths.kb, clean=paths.clean, val_fraction=val_fraction, index_tests=p.index_tests, ranking=ranking
    )
    retrieval = evaluate_retrieval(paths.kb, paths.queries)
    heldout = evaluate_retrieval(paths.kb, paths.heldout_queries)
    model, tokenizer = TissLM.from_pretrained(paths.model), load_tokenizer(paths.model)
    with KnowledgeBase.open(paths.kb) as kb:
        gain = context_gain(
            model, tokenizer, kb, read_split(paths.clean, val_fraction)["val"], window,
            max_documents=p.context_documents, k=p.k, mode=p.mode,
        )  # fmt: skip
    record_grounding(paths.kb, gain)
    metrics = {
        "documents": build["documents"],
        "chunks": build["chunks"],
        "build_seconds": build["seconds"],  # incremental: only added and updated documents cost time
        **{key: build[key] for key in ("added", "updated", "removed", "unchanged")},
        "skipped": build["skipped"],
        "redactions": build["redactions"],
        "ranking": ranking.to_json(),
        "retrieval": retrieval,
        "retrieval_heldout": heldout,
        "context_gain": gain,
        "grounding_worse": gain["bits_per_byte_with_context"] > gain["bits_per_byte_without"],
    }
    atomic_write_json(paths.metrics, metrics)
    print(
        f"knowledge_base: {build['documents']} documents, {build['chunks']} chunks in {build['seconds']:.1f} s "
        f"({build['added']} added, {build['updated']} updated, {build['removed']} removed, {build['unchanged']} unchanged)"
    )
    for label, result in (("project", retrieval), ("held-out", heldout)):
        if not result["answerable"]:
            print(
                f"knowledge_base: {label} queries not scored: none of the {result['queries']} is about an indexed file"
            )
            continue
        mrr = {run: scores["file"]["mrr@10"] for run, scores in result["results"].items()}
        print(
            f"knowledge_base: {label} queries MRR@10 {', '.join(f'{run} {value:.3f}' for run, value in mrr.items())} "
            f"over {result['answerable']} of {result['queries']} (the others are about files not indexed)"
        )
    print(
        f"knowledge_base: val bits/byte {gain['bits_per_byte_without']:.3f} without retrieved context, "
        f"{gain['bits_per_byte_with_context']:.3f} with"
        + (" (worse: the index, the server and generate --kb say so)" if metrics["grounding_worse"] else "")
    )


if __name__ == "__main__":
    run_main(main)

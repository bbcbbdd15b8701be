"""Write the knowledge base's figures into README.md and docs/knowledge_base.md from the files that
measured them, so that no figure is copied by hand:

- metrics/kb.json (the pipeline's knowledge_base stage, `make run` / `dvc repro`);
- benchmarks/results/kb.json (benchmarks/bench_kb.py: the ablation table and latency);
- benchmarks/results/kb_rerank_fit.json (tools/fit_kb_rerank.py: the file reranker's weights).

Each generated block sits between `<!-- kb-figures:NAME -->` and `<!-- /kb-figures:NAME -->`; the
text around the blocks is the writers'. `python tools/kb_figures.py` rewrites the blocks (`make
docs`); `--check` rewrites nothing and exits 1 naming the stale blocks (tests/test_kb_docs.py runs it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METRICS = ROOT / "metrics" / "kb.json"
BENCH = ROOT / "benchmarks" / "results" / "kb.json"
RERANK_FIT = ROOT / "benchmarks" / "results" / "kb_rerank_fit.json"
NO_RERANK_ROW = "no file reranking"  # the start of bench_kb.py's ABLATION row with rerank_weights all 0
README = ROOT / "README.md"
DOCS = ROOT / "docs" / "knowledge_base.md"
RUNS = {
    "fused": "fused (BM25 + dense, RRF, files reranked)",
    "bm25": "BM25 chunks",
    "dense": "dense chunks (WordLlama)",
    "whole_file_bm25": "BM25 over whole files (baseline)",
}
SETS = {"project": "queries.jsonl (project)", "heldout": "queries_heldout.jsonl (held out)"}


def _n(value: int) -> str:
    return f"{value:,}"


def _f(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def _retrieval_table(results: dict) -> list[str]:
    lines = ["| ranking | recall@5 | MRR@10 | nDCG@10 |", "| --- | ---: | ---: | ---: |"]
    for run, label in RUNS.items():
        if run in results:
            file = results[run]["file"]
            lines.append(f"| {label} | {_f(file['recall@5'])} | {_f(file['mrr@10'])} | {_f(file['ndcg@10'])} |")
    return lines


def _pipeline(metrics: dict) -> list[str]:
    """What the last pipeline run measured: the index, retrieval on both query sets, grounding."""
    retrieval, gain = metrics["retrieval"], metrics["context_gain"]
    lines = [
        f"From the last `make run` (`metrics/kb.json`): {_n(metrics['documents'])} train documents, "
        f"{_n(metrics['chunks'])} chunks, built in {metrics['build_seconds']:.1f} s "
        f"({_n(metrics['added'])} added, {_n(metrics['updated'])} updated, {_n(metrics['unchanged'])} unchanged). "
        f"On the {retrieval['answerable']} of the project's {retrieval['queries']} stdlib questions whose file "
        "is in the train split (file-level relevance):",
        "",
        *_retrieval_table(retrieval["results"]),
        "",
    ]
    heldout = metrics.get("retrieval_heldout")
    if heldout:
        lines += [
            f"On the {heldout['answerable']} of the {heldout['queries']} held-out questions "
            "(`queries_heldout.jsonl`, never tuned on) whose file is in the train split:",
            "",
            *_retrieval_table(heldout["results"]),
            "",
        ]
    if "ranking" not in metrics:
        lines += [
            "(This metrics file was written before the code-aware ranking and the held-out query set: the "
            "stage reports both when it next runs; `benchmarks/bench_kb.py` measures the current ranking.)",
            "",
        ]
    without, with_context = gain["bits_per_byte_without"], gain["bits_per_byte_with_context"]
    verdict = (
        "**worse** than none: the index records it, and `tisslm generate --kb`, `tisslm serve --kb` "
        "(stderr at start, `grounding_warning` in `/v1/retrieve` and `/v1/kb`) say so"
        if with_context > without
        else "better than none"
    )
    lines.append(
        f"Retrieved train-split context before {gain['documents']} held-out documents (same "
        f"{gain['window']}-token windows) moves the model's val bits per byte from {without:.4f} to "
        f"{with_context:.4f}: grounding is {verdict}."
    )
    return lines


def _ablation(bench: dict) -> list[str]:
    """The ablation table of benchmarks/results/kb.json: file-level MRR@10 / recall@5 on both sets."""
    retrieval = bench["retrieval"]
    head = (
        f"Index: {retrieval['corpus']}: {_n(retrieval['documents'])} documents, {_n(retrieval['chunks'])} chunks, "
        f"built in {retrieval['index_seconds']:.1f} s. Answerable queries: "
        + ", ".join(f"{SETS[s]} {retrieval[s]['answerable']} of {retrieval[s]['queries']}" for s in SETS)
        + ". One choice changed at a time from the default:"
    )
    lines = [
        head,
        "",
        "| run | project MRR@10 | project R@5 | held-out MRR@10 | held-out R@5 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in retrieval["rows"]:
        cells = [f"{_f(row[s]['mrr@10'])} | {_f(row[s]['recall@5'])}" for s in SETS]
        lines.append(f"| {row['run']} | {' | '.join(cells)} |")
    lines.append("")
    for name, goal in bench["goals"].items():
        met = [key for key, value in goal.items() if value is True]
        missed = [key for key, value in goal.items() if value is False]
        lines.append(
            f"- {SETS[name]}: default MRR@10 {_f(goal['mrr@10'])}, whole-file BM25 {_f(goal['whole_file_mrr@10'])} "
            f"(margin {goal['margin']:+.3f}); met: {', '.join(met) or 'none'}; not met: {', '.join(missed) or 'none'}"
        )
    return lines


def _rerank(fit: dict, bench: dict) -> list[str]:
    """The reranker's fit (tools/fit_kb_rerank.py) and what it changes in the benchmark."""
    mrr = fit["file_mrr@10"]
    rows = {row["run"]: row for row in bench["retrieval"]["rows"]}
    without = next(row for run, row in rows.items() if run.startswith(NO_RERANK_ROW))
    weights = ", ".join(f"{name} {weight}" for name, weight in fit["weights"].items())
    return [
        f"`tools/fit_kb_rerank.py` (`benchmarks/results/kb_rerank_fit.json`), on the {fit['questions']} answerable "
        f"project questions of an index of {_n(fit['index']['documents'])} documents, file-level MRR@10 over the "
        + "fused candidates' files: "
        + "; ".join(f"{run} {_f(value)}" for run, value in mrr.items())
        + f". Weights: {weights}.",
        "",
        "`benchmarks/bench_kb.py`, file-level MRR@10 without and with reranking: "
        + "; ".join(
            f"{SETS[s]} {_f(without[s]['mrr@10'])} -> {_f(rows['default'][s]['mrr@10'])} "
            f"({rows['default'][s]['mrr@10'] - without[s]['mrr@10']:+.3f})"
            for s in SETS
        )
        + ".",
    ]


def _stdlib(bench: dict) -> list[str]:
    stdlib = bench["stdlib"]
    lines = [
        f"On the whole standard library ({_n(stdlib['documents'])} files, no tests, {_n(stdlib['chunks'])} chunks, "
        f"indexed in {stdlib['index_seconds']:.1f} s), every query answerable:",
        "",
        "| run | set | file R@5 | file MRR@10 | file nDCG@10 | function R@5 | function MRR@10 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, evaluation in stdlib["retrieval"].items():
        for run, label in RUNS.items():
            r = evaluation["results"].get(run)
            if r:
                f, g = r["file"], r["graded"]
                lines.append(
                    f"| {label} | {name} | {_f(f['recall@5'])} | {_f(f['mrr@10'])} | {_f(f['ndcg@10'])} | "
                    f"{_f(g['function_recall@5'])} | {_f(g['function_mrr@10'])} |"
                )
    return lines


def _speed(bench: dict) -> list[str]:
    stdlib, scales = bench["stdlib"], bench["latency"]
    lines = [
        f"- Indexing the standard library ({stdlib['megabytes']} MB, {_n(stdlib['chunks'])} chunks): "
        f"{stdlib['index_seconds']:.1f} s, {stdlib['index_mb_per_s']} MB/s; re-indexing it unchanged: "
        f"{stdlib['unchanged_reindex_seconds']:.1f} s. Index size {stdlib['index_bytes'] / 1e6:.1f} MB.",
        "",
        "| chunks | bm25 p50 / p99 | dense p50 / p99 | fused p50 / p99 | bm25s p50 / p99 (anchor) | index MB/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, s in scales.items():
        t = s["tisslm"]
        cells = [f"{t[m]['p50_ms']} / {t[m]['p99_ms']} ms" for m in ("bm25", "dense", "fused")]
        lines.append(
            f"| {_n(int(n))} | {' | '.join(cells)} | {s['bm25s']['p50_ms']} / {s['bm25s']['p99_ms']} ms | "
            f"{s['index_mb_per_s']} |"
        )
    return lines


def blocks() -> dict[Path, dict[str, list[str]]]:
    metrics = json.loads(METRICS.read_text(encoding="utf-8"))
    bench = json.loads(BENCH.read_text(encoding="utf-8"))
    fit = json.loads(RERANK_FIT.read_text(encoding="utf-8"))
    goals = bench["goals"]
    summary = [
        "`benchmarks/bench_kb.py` (`benchmarks/results/kb.json`), on the index the pipeline builds, default "
        "ranking against whole-file BM25, file-level MRR@10: "
        + "; ".join(
            f"{SETS[s]} {_f(g['mrr@10'])} vs {_f(g['whole_file_mrr@10'])} ({g['margin']:+.3f})"
            for s, g in goals.items()
        )
        + ". Fused query p50 "
        + " and ".join(
            f"{s['tisslm']['fused']['p50_ms']} ms at {_n(int(n))} chunks" for n, s in bench["latency"].items()
        )
        + ". Ablation and details: `docs/knowledge_base.md`.",
    ]
    return {
        README: {"pipeline": _pipeline(metrics), "bench": summary},
        DOCS: {
            "pipeline": _pipeline(metrics),
            "ablation": _ablation(bench),
            "rerank": _rerank(fit, bench),
            "stdlib": _stdlib(bench),
            "speed": _speed(bench),
        },
    }


def render(text: str, generated: dict[str, list[str]], where: str) -> str:
    for name, lines in generated.items():
        pattern = re.compile(rf"(<!-- kb-figures:{name} -->\n).*?(<!-- /kb-figures:{name} -->)", re.DOTALL)
        if not pattern.search(text):
            raise SystemExit(f"{where}: no <!-- kb-figures:{name} --> ... <!-- /kb-figures:{name} --> block")
        text = pattern.sub(lambda m, lines=lines: m.group(1) + "\n".join(lines) + "\n" + m.group(2), text)
    return text


def stale() -> list[str]:
    """The blocks whose text differs from what the figures files say now."""
    out = []
    for path, generated in blocks().items():
        text = path.read_text(encoding="utf-8")
        for name, lines in generated.items():
            if render(text, {name: lines}, str(path)) != text:
                out.append(f"{path.relative_to(ROOT)}: kb-figures:{name}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 if a block is stale")
    args = parser.parse_args()
    if args.check:
        if found := stale():
            print("stale knowledge-base figures (run `make docs`): " + ", ".join(found), file=sys.stderr)
            sys.exit(1)
        return
    for path, generated in blocks().items():
        text = path.read_text(encoding="utf-8")
        new = render(text, generated, str(path.relative_to(ROOT)))
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"rewrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

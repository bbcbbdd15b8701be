"""Data-stage benchmarks: writes benchmarks/results/data.json.

- the ingest and clean stages on the default corpus, run as `python -m stages.<name>` (the wall
  time a user waits, imports and validation included) and their in-process throughput;
- MinHash throughput on one core (shingling + signatures), against BigCode's published
  ~0.8 MB/s per vCPU for their near-deduplication;
- near-deduplication recall and precision on a synthetic corpus with planted near-copies.

Run from the repository root after `dvc repro clean` or on a fresh checkout (it runs the stages
itself): python benchmarks/bench_data.py
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from pathlib import Path

from datasketch import MinHash

from tisslm.core.config import CleanParams, IngestParams
from tisslm.core.io import atomic_write_json
from tisslm.data.clean import clean, normalize
from tisslm.data.dedup import TOKEN_RE, jaccard, minhash_signature, near_duplicate_clusters, shingle_hashes
from tisslm.data.ingest import ingest

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # the planted corpora the tests use
from synthetic import planted_near_duplicates

RESULTS = Path(__file__).parent / "results" / "data.json"
BIGCODE_MB_PER_S_PER_VCPU = 0.8


def stage_wall_seconds(name: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", f"stages.{name}"], check=True, capture_output=True)
    return time.perf_counter() - start


def datasketch_default_signature(text: str, params: CleanParams) -> None:
    """The textbook use of datasketch: joined n-gram strings, hashed by its default sha1_hash32."""
    tokens = TOKEN_RE.findall(text)
    size = params.dedup.shingle_size
    grams = {" ".join(tokens[i : i + size]).encode() for i in range(max(1, len(tokens) - size + 1))}
    MinHash(num_perm=params.dedup.num_perm, seed=params.dedup.seed).update_batch(list(grams))


def minhash_throughput(texts: list[str], params: CleanParams) -> dict:
    """Shingling + MinHash signatures in this one process (MB/s per core), ours against the
    textbook datasketch usage on the same texts, alternating."""
    dedup = params.dedup
    seconds = {"tisslm": 0.0, "datasketch_default": 0.0}
    for text in texts:
        start = time.perf_counter()
        minhash_signature(shingle_hashes(text, dedup.shingle_size), dedup.num_perm, dedup.seed)
        middle = time.perf_counter()
        datasketch_default_signature(text, params)
        seconds["tisslm"] += middle - start
        seconds["datasketch_default"] += time.perf_counter() - middle
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    ours = megabytes / seconds["tisslm"]
    return {
        "megabytes": megabytes,
        "seconds": seconds,
        "mb_per_s_per_core": ours,
        "datasketch_default_mb_per_s_per_core": megabytes / seconds["datasketch_default"],
        "speedup_vs_datasketch_default": seconds["datasketch_default"] / seconds["tisslm"],
        # Published figure, other hardware: a reference point, not a side-by-side measurement.
        "vs_bigcode_published_0_8_mb_per_s_per_vcpu": ours / BIGCODE_MB_PER_S_PER_VCPU,
    }


def dedup_quality(n_docs: int, params: CleanParams) -> dict:
    dedup = params.dedup
    docs, origin = planted_near_duplicates(n_docs, seed=0)
    shingles = [shingle_hashes(d, dedup.shingle_size) for d in docs]
    signatures = [minhash_signature(s, dedup.num_perm, dedup.seed) for s in shingles]
    clusters = near_duplicate_clusters(signatures, shingles, dedup.threshold, dedup.num_perm, dedup.seed)
    found = {pair for c in clusters for pair in itertools.combinations(c, 2)}
    true_pairs = {
        (a, b)
        for a, b in itertools.combinations(range(len(docs)), 2)
        if origin[a] == origin[b] and jaccard(shingles[a], shingles[b]) >= dedup.threshold
    }
    return {
        "documents": len(docs),
        "planted_pairs_at_or_above_threshold": len(true_pairs),
        "found_pairs": len(found),
        "recall": len(found & true_pairs) / len(true_pairs),
        "precision": sum(origin[a] == origin[b] for a, b in found) / max(1, len(found)),
        "threshold": dedup.threshold,
    }


def main() -> None:
    ingest_params, clean_params = IngestParams(), CleanParams()
    print("stages as a user runs them ...", flush=True)
    wall = {"ingest": stage_wall_seconds("ingest"), "clean": stage_wall_seconds("clean")}

    print("in-process throughput ...", flush=True)
    start = time.perf_counter()
    raw, ingest_report = ingest(ingest_params)
    ingest_seconds = time.perf_counter() - start
    start = time.perf_counter()
    _, clean_report = clean(raw, clean_params)
    clean_seconds = time.perf_counter() - start
    megabytes = ingest_report.bytes_kept / 1e6

    print("MinHash on one core ...", flush=True)
    texts = [normalize(t, clean_params.unicode_form) for t in raw["text"]]
    report = {
        "corpus": {"source": "stdlib", "documents": ingest_report.kept, "megabytes": megabytes},
        "stage_wall_seconds": wall,
        "clean_stage_goal_under_15_s": wall["clean"] < 15,
        "ingest": {"seconds": ingest_seconds, "mb_per_s": megabytes / ingest_seconds},
        "clean": {
            "seconds": clean_seconds,
            "mb_per_s": megabytes / clean_seconds,
            "num_proc": clean_params.num_proc,
            "phase_seconds": clean_report.seconds,
        },
        "minhash_one_core": minhash_throughput(texts, clean_params),
        "near_dedup_quality": dedup_quality(400, clean_params),
    }
    atomic_write_json(RESULTS, report)
    print(
        f"clean stage {wall['clean']:.1f} s wall; MinHash {report['minhash_one_core']['mb_per_s_per_core']:.2f} MB/s/core"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

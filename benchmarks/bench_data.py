"""Data stages at two scales: writes benchmarks/results/data.json.

The clean stage as it was before datatrove (`datasets.map` workers, every document and MinHash in
memory, an in-memory LSH; its code taken from git at BASELINE) against the datatrove pipeline, on
the same raw shards of two corpora: the standard library (the default run) and the .py files of
this environment's installed distributions (`{type: site_packages}`, about 13x larger). For each:
wall time of `python -m stages.clean`, MB/s per core, peak RSS of the whole process tree (workers
included, sampled every 50 ms), documents kept and duplicates found.

Run from the repository root (git history needed; the baseline also needs `datasketch`):
    python benchmarks/bench_data.py [--skip-site-packages]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import psutil
import yaml

from tisslm.core.io import atomic_write_json

ROOT = Path(__file__).parents[1]
RESULTS = Path(__file__).parent / "results" / "data.json"
BASELINE = "d41c4f6"  # the last commit with the in-memory clean stage
CORES = 2
CORPORA = {
    "stdlib": [{"type": "stdlib"}, {"type": "stdlib", "part": "tests", "train_only": True}],
    "site_packages": [{"type": "site_packages"}],
}


def run_measured(command: list[str], cwd: Path, env: dict, check: bool = True) -> dict:
    """Wall seconds and peak RSS (MB) of `command` and all its descendants; a failure raises, or
    with check=False is recorded (exit code and the last line of stderr)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace")
    result = {"seconds": round(seconds, 2), "peak_rss_mb": round(peak / 1e6, 1)}
    if process.returncode and check:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{stderr[-3000:]}")
    if process.returncode:
        result |= {"exit_code": process.returncode, "error": stderr.strip().splitlines()[-1]}
    return result


def baseline_tree(directory: Path) -> Path:
    """src/ and stages/ as they were at BASELINE."""
    archive = subprocess.run(["git", "archive", BASELINE, "src", "stages"], cwd=ROOT, capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(directory, filter="data")
    return directory


def workspace(directory: Path, params: dict) -> Path:
    directory.mkdir(parents=True)
    (directory / "params.yaml").write_text(yaml.safe_dump(params))
    return directory


def clean_command(raw: Path, work: Path | None) -> list[str]:
    command = [sys.executable, "-m", "stages.clean", "--raw", str(raw), "--clean", "data/clean"]
    command += ["--metrics", "metrics/clean.json", "--validation", "metrics/validation.json"]
    command += ["--data-docs", "reports/data_docs"]
    return command + (["--work", str(work)] if work else [])


def summary(run: dict, metrics_dir: Path) -> dict:
    clean = json.loads((metrics_dir / "clean.json").read_text())
    seconds = run["seconds"]
    return run | {
        "mb_in": round(clean["bytes_in"] / 1e6, 1),
        "mb_per_s_per_core": round(clean["bytes_in"] / 1e6 / seconds / CORES, 3),
        "docs_in": clean["docs_in"],
        "docs_out": clean["docs_out"],
        "exact_duplicates": clean["dropped"].get("exact_duplicate", 0),
        "near_duplicates": clean["dropped"].get("near_duplicate", 0),
    }


def bench_corpus(name: str, sources: list[dict], scratch: Path, baseline: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"]["sources"] = sources
    env = os.environ | {"PYTHONPATH": str(ROOT / "src") + os.pathsep + str(ROOT)}
    ingest_dir = workspace(scratch / name / "ingest", params)
    ingest = run_measured(
        [
            *(sys.executable, "-m", "stages.ingest", "--raw", "data/raw", "--metrics", "metrics/ingest.json"),
            *("--validation", "metrics/validation.json", "--data-docs", "reports/data_docs"),
        ],
        ingest_dir,
        env,
    )
    raw = ingest_dir / "data" / "raw"
    print(f"{name}: ingest {ingest}", flush=True)

    new_dir = workspace(scratch / name / "datatrove", params)
    new = summary(run_measured(clean_command(raw, new_dir / "work"), new_dir, env), new_dir / "metrics")
    print(f"{name}: datatrove clean {new}", flush=True)

    old_params = json.loads(json.dumps(params))
    for key in ("executor", "tasks", "workers"):
        old_params["clean"].pop(key)
    old_params["clean"]["num_proc"] = CORES
    old_params["ingest"]["sources"] = CORPORA["stdlib"]  # its schema predates site_packages; it only reads raw
    old_dir = workspace(scratch / name / "baseline", old_params)
    old_env = os.environ | {"PYTHONPATH": str(baseline / "src") + os.pathsep + str(baseline)}
    # The old stage can fail its own gate at the very end (a document that redaction shortened
    # below min_chars, which it never re-checked): its work is measured all the same.
    old = summary(run_measured(clean_command(raw, None), old_dir, old_env, check=False), old_dir / "metrics")
    print(f"{name}: baseline clean {old}", flush=True)
    return {
        "raw_mb": round(sum(f.stat().st_size for f in raw.glob("*.parquet")) / 1e6, 1),
        "ingest_stage": ingest,
        "clean_stage": {"baseline_in_memory": old, "datatrove": new},
        "datatrove_vs_baseline_speed": round(old["seconds"] / new["seconds"], 3),
        "datatrove_vs_baseline_peak_rss": round(new["peak_rss_mb"] / old["peak_rss_mb"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-site-packages", action="store_true", help="the stdlib corpus only (about a minute)")
    args = parser.parse_args()
    corpora = {k: v for k, v in CORPORA.items() if not (args.skip_site_packages and k == "site_packages")}
    results: dict = {
        "machine": {"cpu": platform.machine(), "cores": CORES, "python": platform.python_version()},
        "baseline_commit": BASELINE,
        "corpora": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        baseline = baseline_tree(Path(scratch) / "baseline")
        for name, sources in corpora.items():
            results["corpora"][name] = bench_corpus(name, sources, Path(scratch), baseline)
    if {"stdlib", "site_packages"} <= results["corpora"].keys():
        small, large = (results["corpora"][k]["clean_stage"] for k in ("stdlib", "site_packages"))
        results["growth"] = {
            "corpus": round(large["datatrove"]["mb_in"] / small["datatrove"]["mb_in"], 1),
            "datatrove_peak_rss": round(large["datatrove"]["peak_rss_mb"] / small["datatrove"]["peak_rss_mb"], 2),
            "baseline_peak_rss": round(
                large["baseline_in_memory"]["peak_rss_mb"] / small["baseline_in_memory"]["peak_rss_mb"], 2
            ),
        }
    atomic_write_json(RESULTS, results)
    print(json.dumps(results.get("growth", {}), indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

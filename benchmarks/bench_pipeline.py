"""Orchestration overhead on an up-to-date project: writes benchmarks/results/pipeline.json.

- `dvc repro` with nothing changed (the acceptance bound is 5 s), and `dvc status`;
- the `tisslm-pipeline` flow on the same up-to-date project, against `dvc repro`: what Prefect
  (an ephemeral server), one MLflow run per stage and one `dvc repro --single-item` per stage add
  when every stage is reused. The two alternate, and the medians are compared.

Run from the repository root after `make run` (the pipeline must be up to date):
python benchmarks/bench_pipeline.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tisslm.core.io import atomic_write_json

RESULTS = Path(__file__).parent / "results" / "pipeline.json"
ROUNDS = 3


def wall_seconds(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, result.stdout + result.stderr


def main() -> None:
    os.environ.update(
        ITERATIVE_DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false"
    )
    dvc = [sys.executable, "-m", "dvc"]
    tisslm = [str(Path(sys.executable).with_name("tisslm"))]
    seconds: dict[str, list[float]] = {"dvc_status": [], "dvc_repro_noop": [], "flow_noop": []}
    for _ in range(ROUNDS):
        elapsed, _ = wall_seconds([*dvc, "status"])
        seconds["dvc_status"].append(elapsed)
        elapsed, output = wall_seconds([*dvc, "repro"])
        if "Running stage" in output:
            raise SystemExit("the pipeline is not up to date: run `make run` first")
        seconds["dvc_repro_noop"].append(elapsed)
        elapsed, output = wall_seconds([*tisslm, "pipeline", "run"])
        seconds["flow_noop"].append(elapsed)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    result = {
        "rounds": ROUNDS,
        "seconds": seconds,
        "median_seconds": medians,
        "dvc_repro_noop_under_5s": medians["dvc_repro_noop"] < 5,
        "flow_over_dvc_repro_noop": medians["flow_noop"] / medians["dvc_repro_noop"],
        "prefect_api_url": os.environ.get("PREFECT_API_URL", "ephemeral"),
        "cpu_count": os.cpu_count(),
    }
    atomic_write_json(RESULTS, result)
    print(
        f"dvc repro (no-op) {medians['dvc_repro_noop']:.2f} s, dvc status {medians['dvc_status']:.2f} s, "
        f"flow (no-op) {medians['flow_noop']:.1f} s = {result['flow_over_dvc_repro_noop']:.1f}x; wrote {RESULTS}"
    )


if __name__ == "__main__":
    main()

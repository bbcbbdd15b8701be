"""DVC stage `ingest`: the sources in params.yaml -> data/raw (parquet shards) + metrics/ingest.json."""

from __future__ import annotations

from pathlib import Path

from tisslm.config import load_params
from tisslm.data.ingest import ingest
from tisslm.data.shards import write_shards
from tisslm.data.validate import raw_expectations, validate_table
from tisslm.errors import run_main
from tisslm.io import atomic_write_json

RAW = Path("data/raw")
METRICS = Path("metrics/ingest.json")
VALIDATION = Path("metrics/validation_raw.json")
DOCS = Path("reports/data_docs")


def main() -> None:
    params = load_params().ingest
    table, report = ingest(params)
    atomic_write_json(METRICS, report.to_json())
    validate_table(table.to_pandas(), "raw", raw_expectations(params), VALIDATION, DOCS)
    shards = write_shards(table, RAW, params.shard_rows)
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(report.skipped.items())) or "none"
    print(f"ingest: seen {report.seen}, kept {report.kept} ({report.bytes_kept / 1e6:.1f} MB), skipped: {skipped}")
    print(f"ingest: wrote {len(shards)} shard(s) to {RAW}/, metrics to {METRICS}")


if __name__ == "__main__":
    run_main(main)

"""DVC stage `clean`: data/raw -> data/clean (normalised, filtered, deduplicated, anonymised)."""

from __future__ import annotations

from pathlib import Path

from tisslm.config import load_params
from tisslm.data.clean import clean
from tisslm.data.shards import read_shards, write_shards
from tisslm.data.validate import clean_expectations, validate_table
from tisslm.errors import run_main
from tisslm.io import atomic_write_json

RAW = Path("data/raw")
CLEAN = Path("data/clean")
METRICS = Path("metrics/clean.json")
VALIDATION = Path("metrics/validation_clean.json")
DOCS = Path("reports/data_docs")


def main() -> None:
    params = load_params()
    table, report = clean(read_shards(RAW), params.clean)
    atomic_write_json(METRICS, report.to_json())
    validate_table(table.to_pandas(), "clean", clean_expectations(params.clean), VALIDATION, DOCS)
    write_shards(table, CLEAN, params.ingest.shard_rows)
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(report.dropped.items())) or "none"
    redacted = ", ".join(f"{k} {v}" for k, v in sorted(report.redactions.items()) if v) or "none"
    print(f"clean: {report.docs_in} -> {report.docs_out} documents; dropped: {dropped}; redacted: {redacted}")
    print(f"clean: wrote {CLEAN}/, metrics to {METRICS}, data docs in {DOCS}/index.html")


if __name__ == "__main__":
    run_main(main)

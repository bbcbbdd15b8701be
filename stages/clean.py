"""DVC stage `clean`: data/raw -> data/clean (normalised, filtered, deduplicated, anonymised)."""

from __future__ import annotations

from stages import stage_paths
from tisslm.core.config import load_params
from tisslm.core.errors import run_main
from tisslm.core.io import atomic_write_json
from tisslm.data.clean import clean
from tisslm.data.shards import read_shards, write_shards
from tisslm.data.validate import clean_expectations, validate_table


def main() -> None:
    paths = stage_paths(__doc__, ["raw", "clean", "metrics", "validation", "data_docs"])
    params = load_params()
    table, report = clean(read_shards(paths.raw), params.clean)
    atomic_write_json(paths.metrics, report.to_json())
    validate_table(table.to_pandas(), "clean", clean_expectations(params.clean), paths.validation, paths.data_docs)
    write_shards(table, paths.clean, params.ingest.shard_rows)
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(report.dropped.items())) or "none"
    redacted = ", ".join(f"{k} {v}" for k, v in sorted(report.redactions.items()) if v) or "none"
    print(f"clean: {report.docs_in} -> {report.docs_out} documents; dropped: {dropped}; redacted: {redacted}")
    print(f"clean: wrote {paths.clean}/, metrics to {paths.metrics}, data docs in {paths.data_docs}/index.html")


if __name__ == "__main__":
    run_main(main)

"""DVC stage `ingest`: the sources in params.yaml -> data/raw (parquet shards) + metrics/ingest.json."""

from __future__ import annotations

from stages import stage_paths
from tisslm.core.config import load_params
from tisslm.core.errors import run_main
from tisslm.core.io import atomic_write_json
from tisslm.data.ingest import ingest
from tisslm.data.shards import write_shards
from tisslm.data.validate import raw_expectations, validate_table


def main() -> None:
    paths = stage_paths(__doc__, ["raw", "metrics", "validation", "data_docs"])
    params = load_params().ingest
    table, report = ingest(params)
    atomic_write_json(paths.metrics, report.to_json())
    validate_table(table.to_pandas(), "raw", raw_expectations(params), paths.validation, paths.data_docs)
    shards = write_shards(table, paths.raw, params.shard_rows)
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(report.skipped.items())) or "none"
    print(f"ingest: seen {report.seen}, kept {report.kept} ({report.bytes_kept / 1e6:.1f} MB), skipped: {skipped}")
    print(f"ingest: wrote {len(shards)} shard(s) to {paths.raw}/, metrics to {paths.metrics}")


if __name__ == "__main__":
    run_main(main)

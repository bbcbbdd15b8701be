"""DVC stage `clean`: data/raw -> data/clean (normalised, filtered, deduplicated, anonymised) with datatrove."""

from __future__ import annotations

import shutil

from stages import stage_paths
from tisslm.core.config import load_params
from tisslm.core.errors import run_main
from tisslm.core.io import atomic_write_json
from tisslm.data.clean import clean_documents, write_clean
from tisslm.data.validate import ShardedValidation, clean_row_expectations, clean_table_expectations


def main() -> None:
    paths = stage_paths(__doc__, ["raw", "work", "clean", "metrics", "validation", "data_docs"])
    params = load_params()
    work, report = clean_documents(paths.raw, paths.work, params.clean)
    validation = ShardedValidation(
        "clean",
        clean_row_expectations(params.clean),
        clean_table_expectations(params.clean),
        paths.validation,
        paths.data_docs,
    )
    atomic_write_json(paths.metrics, report.to_json())  # what happened, even when validation then fails
    report.docs_out, report.bytes_out = write_clean(work, paths.clean, params.ingest.shard_rows, validation)
    atomic_write_json(paths.metrics, report.to_json())
    shutil.rmtree(work)  # kept only while a run may resume
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(report.dropped.items())) or "none"
    redacted = ", ".join(f"{k} {v}" for k, v in sorted(report.redactions.items()) if v) or "none"
    print(f"clean: {report.docs_in} -> {report.docs_out} documents; dropped: {dropped}; redacted: {redacted}")
    print(f"clean: wrote {paths.clean}/, metrics to {paths.metrics}, data docs in {paths.data_docs}/index.html")


if __name__ == "__main__":
    run_main(main)

"""Great Expectations suites for the raw and clean document tables.

A failed suite stops the stage before it writes its output (exit status 1, a message naming
each failed expectation); the results go to metrics/ for `dvc metrics` and the rendered data
docs to reports/ for people.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from tisslm.core.config import CleanParams, IngestParams
from tisslm.core.errors import ValidationFailed
from tisslm.core.io import atomic_write_json
from tisslm.data.anonymize import LEAK_PATTERNS
from tisslm.data.shards import COLUMNS

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def _common(min_rows: int) -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(COLUMNS), exact_match=True),
        gxe.ExpectTableRowCountToBeBetween(min_value=min_rows),
        *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in COLUMNS),
        gxe.ExpectColumnValuesToBeUnique(column="id"),
        gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex=r"^[0-9a-f]{64}$"),
    ]


def raw_expectations(params: IngestParams) -> list:
    import great_expectations.expectations as gxe

    return [
        *_common(params.min_rows),
        gxe.ExpectColumnValuesToBeBetween(column="n_bytes", min_value=1, max_value=params.max_file_bytes),
    ]


def clean_expectations(params: CleanParams) -> list:
    import great_expectations.expectations as gxe

    return [
        *_common(params.min_rows),
        gxe.ExpectColumnValuesToBeUnique(column="sha256"),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="text", min_value=params.filters.min_chars, max_value=params.filters.max_chars
        ),
        gxe.ExpectColumnValuesToNotMatchRegexList(column="text", regex_list=list(LEAK_PATTERNS.values())),
    ]


def _describe(result) -> dict:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k in ("column", "min_value", "max_value", "regex")}
    summary = {"expectation": config.type, **kwargs, "success": result.success}
    for key in ("observed_value", "unexpected_count", "unexpected_percent", "partial_unexpected_list"):
        value = result.result.get(key)
        if value is not None:
            summary[key] = [str(v)[:80] for v in value[:3]] if key == "partial_unexpected_list" else value
    return summary


def validate_table(
    df: pd.DataFrame, name: str, expectations: list, results_path: Path, docs_dir: Path | None = None
) -> dict:
    """Run the expectations on `df`; save a summary to `results_path`; raise if any failed."""
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    actions = []
    if docs_dir is not None:
        site = {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(docs_dir).resolve())}
        context.add_data_docs_site("local", {"class_name": "SiteBuilder", "store_backend": site})
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs"))
    batch = context.data_sources.add_pandas(name).add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
    suite = context.suites.add(gx.ExpectationSuite(name=name))
    for expectation in expectations:
        suite.add_expectation(expectation)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(name=name, validation_definitions=[definition], actions=actions, result_format="SUMMARY")
    )
    run = checkpoint.run(batch_parameters={"dataframe": df})
    results = [_describe(r) for validation in run.run_results.values() for r in validation.results]
    summary = {
        "suite": name,
        "success": run.success,
        "evaluated": len(results),
        "failed": sum(not r["success"] for r in results),
        "results": results,
    }
    atomic_write_json(results_path, summary)
    if not run.success:
        failed = [
            f"{r['expectation']}({r.get('column', 'table')})"
            + (f" [{r['unexpected_count']} unexpected]" if r.get("unexpected_count") else "")
            for r in results
            if not r["success"]
        ]
        raise ValidationFailed(f"{name} data failed validation: {'; '.join(failed)} (details: {results_path})")
    return summary

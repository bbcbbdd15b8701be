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

TABLE_COLUMNS = ("id", "sha256")  # what the table-wide checks of a sharded table keep of each row

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def _common(min_rows: int) -> list:
    return [*_row_level(), *_table_level(min_rows, unique=["id"])]


def _row_level() -> list:
    """Expectations that hold shard by shard."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableColumnsToMatchSet(column_set=list(COLUMNS), exact_match=True),
        *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in COLUMNS),
        gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex=r"^[0-9a-f]{64}$"),
    ]


def _table_level(min_rows: int, unique: list[str]) -> list:
    """Expectations about the whole table: its size and the uniqueness of `unique` columns."""
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=min_rows),
        *(gxe.ExpectColumnValuesToBeUnique(column=c) for c in unique),
    ]


def raw_expectations(params: IngestParams) -> list:
    import great_expectations.expectations as gxe

    return [
        *_common(params.min_rows),
        gxe.ExpectColumnValuesToBeBetween(column="n_bytes", min_value=1, max_value=params.max_file_bytes),
    ]


def clean_row_expectations(params: CleanParams) -> list:
    import great_expectations.expectations as gxe

    return [
        *_row_level(),
        gxe.ExpectColumnValueLengthsToBeBetween(
            column="text", min_value=params.filters.min_chars, max_value=params.filters.max_chars
        ),
        gxe.ExpectColumnValuesToNotMatchRegexList(column="text", regex_list=list(LEAK_PATTERNS.values())),
    ]


def clean_table_expectations(params: CleanParams) -> list:
    return _table_level(params.min_rows, unique=list(TABLE_COLUMNS))


def _describe(result) -> dict:
    config = result.expectation_config
    kwargs = {k: v for k, v in config.kwargs.items() if k in ("column", "min_value", "max_value", "regex")}
    summary = {"expectation": config.type, **kwargs, "success": result.success}
    for key in ("observed_value", "unexpected_count", "unexpected_percent", "partial_unexpected_list"):
        value = result.result.get(key)
        if value is not None:
            summary[key] = [str(v)[:80] for v in value[:3]] if key == "partial_unexpected_list" else value
    return summary


class Suite:
    """One expectation suite in an ephemeral Great Expectations context, run on any number of frames."""

    def __init__(self, name: str, expectations: list, docs_dir: Path | None = None):
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        logging.getLogger("great_expectations").setLevel(logging.ERROR)
        context = gx.get_context(mode="ephemeral")
        # A bar per checkpoint run, well under a second each: noise in the stage logs (four lines a run).
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        actions = []
        if docs_dir is not None:
            site = {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(docs_dir).resolve())}
            context.add_data_docs_site("local", {"class_name": "SiteBuilder", "store_backend": site})
            actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs"))
        asset = context.data_sources.add_pandas(name).add_dataframe_asset(name)
        batch = asset.add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        self.checkpoint = context.checkpoints.add(
            gx.Checkpoint(name=name, validation_definitions=[definition], actions=actions, result_format="SUMMARY")
        )

    def run(self, df: pd.DataFrame) -> list[dict]:
        run = self.checkpoint.run(batch_parameters={"dataframe": df})
        return [_describe(r) for validation in run.run_results.values() for r in validation.results]


def write_summary(name: str, results: list[dict], results_path: Path, **extra) -> dict:
    """Save the results to `results_path`; raise ValidationFailed naming each failed expectation."""
    summary = {
        "suite": name,
        "success": all(r["success"] for r in results),
        "evaluated": len(results),
        "failed": sum(not r["success"] for r in results),
        **extra,
        "results": results,
    }
    atomic_write_json(results_path, summary)
    if not summary["success"]:
        failed = [
            f"{r['expectation']}({r.get('column', 'table')})"
            + (f" [{r['unexpected_count']} unexpected]" if r.get("unexpected_count") else "")
            for r in results
            if not r["success"]
        ]
        raise ValidationFailed(f"{name} data failed validation: {'; '.join(failed)} (details: {results_path})")
    return summary


def validate_table(
    df: pd.DataFrame, name: str, expectations: list, results_path: Path, docs_dir: Path | None = None
) -> dict:
    """Run the expectations on `df`; save a summary to `results_path`; raise if any failed."""
    return write_summary(name, Suite(name, expectations, docs_dir).run(df), results_path)


class ShardedValidation:
    """The suites of a table too large to load: row-level expectations on every shard as it is
    written, table-wide ones (row count, uniqueness) once, on the TABLE_COLUMNS of all shards."""

    def __init__(
        self,
        name: str,
        row_expectations: list,
        table_expectations: list,
        results_path: Path,
        docs_dir: Path | None = None,
    ):
        self.name = name
        self.results_path = results_path
        self.rows = Suite(name, row_expectations, docs_dir)
        self.table = Suite(f"{name}_table", table_expectations, docs_dir)
        self.results: dict[str, dict] = {}  # by expectation and column: the first failure, or the last success
        self.kept: list[pd.DataFrame] = []
        self.shards = 0

    def check(self, shard: pd.DataFrame) -> None:
        self.shards += 1
        for result in self.rows.run(shard):
            key = f"{result['expectation']}:{result.get('column', '')}"
            previous = self.results.get(key)
            if previous is not None and not previous["success"]:
                previous["unexpected_count"] = previous.get("unexpected_count", 0) + result.get("unexpected_count", 0)
                continue
            self.results[key] = result | {"shard": self.shards - 1}
        self.kept.append(shard[list(TABLE_COLUMNS)])

    def finish(self) -> dict:
        """Run the table-wide suite, save every result, raise if anything failed."""
        table = pd.concat(self.kept, ignore_index=True) if self.kept else pd.DataFrame(columns=list(TABLE_COLUMNS))
        results = [*self.results.values(), *self.table.run(table)]
        return write_summary(self.name, results, self.results_path, shards=self.shards)

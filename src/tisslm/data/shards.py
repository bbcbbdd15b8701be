"""Document tables on disk: parquet shards written with `datasets`, one directory per stage output."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from tisslm.core.errors import TissLMError
from tisslm.core.io import atomic_dir

if TYPE_CHECKING:  # imported where used: training reads token files and never needs `datasets`
    import datasets

COLUMNS = ("id", "source", "path", "text", "n_bytes", "sha256", "train_only")
SHARD_SCHEMA = pa.schema(
    [
        (name, pa.int64() if name == "n_bytes" else pa.bool_() if name == "train_only" else pa.string())
        for name in COLUMNS
    ]
)


def doc_id(source: str, path: str) -> str:
    """Stable id of a document: the same source and path give the same id on every run."""
    return hashlib.sha256(f"{source}\0{path}".encode()).hexdigest()[:16]


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def shard_tables(rows: Iterable[dict], shard_rows: int) -> Iterator[pa.Table]:
    """`rows` (dicts with COLUMNS) as tables of `shard_rows` rows, one at a time; one empty table for no rows."""
    rows = iter(rows)
    first = True
    while (batch := list(islice(rows, shard_rows))) or first:
        first = False
        yield pa.Table.from_pylist(batch, schema=SHARD_SCHEMA)


def write_shards(table: datasets.Dataset, directory: str | Path, shard_rows: int) -> list[Path]:
    """Replace `directory` atomically with `table` as shard-00000.parquet, shard-00001.parquet, ..."""
    names = []
    with atomic_dir(directory) as tmp:
        n_shards = max(1, -(-len(table) // shard_rows))
        for i in range(n_shards):
            shard = table.select(range(i * shard_rows, min(len(table), (i + 1) * shard_rows)))
            name = shard_name(i)
            shard.to_parquet(str(tmp / name))
            names.append(name)
    return [Path(directory) / n for n in names]


def checked_shard_files(directory: str | Path) -> list[Path]:
    """The shard files of `directory` in order, each checked (footer and columns) before any is read;
    a one-line error naming the file if one is unusable."""
    directory = Path(directory)
    files = sorted(directory.glob("shard-*.parquet"))
    if not files:
        raise TissLMError(f"{directory}: no shard-*.parquet files (run the stage that writes it first)")
    for file in files:
        try:
            columns = set(pq.read_schema(file).names)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise TissLMError(f"{file}: not a readable parquet file ({one_line(err)})") from None
        if missing := set(COLUMNS) - columns:
            raise TissLMError(f"{file}: missing columns {sorted(missing)}")
    return files


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def read_shards(directory: str | Path) -> datasets.Dataset:
    """The shards of `directory`, in order, as one in-memory Dataset; a one-line error if unusable."""
    files = checked_shard_files(directory)
    import datasets

    return datasets.Dataset.from_parquet([str(f) for f in files], keep_in_memory=True)

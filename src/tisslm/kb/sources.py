"""Where an index's documents come from: a directory, the clean corpus's train split, or a file list.

Each source yields every document it offers, either with its text or with the reason it was
skipped (binary, not_utf8, too_large, ...), using the ingest stage's own readers so that a file
the pipeline would skip is skipped here for the same reason.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tisslm.core.config import DirSource
from tisslm.core.errors import TissLMError


@dataclass(frozen=True)
class Document:
    """A document offered to the index. `key` identifies it across builds (incremental updates
    compare its text's hash under that key); `path` is what hits show."""

    key: str
    path: str
    text: str | None = None
    skip: str | None = None  # binary, not_utf8, empty, too_large, unreadable, broken_symlink, missing


def directory_documents(
    root: Path, include: Sequence[str], exclude: Sequence[str], max_bytes: int
) -> Iterator[Document]:
    """Files under `root` chosen by gitignore-style globs, keyed and shown by their relative path."""
    from tisslm.data.ingest import dir_files, read_text_file  # imports `datasets` (a second): only when building

    root, files = dir_files(DirSource(type="dir", path=root, include=list(include), exclude=list(exclude)))
    for path in files:
        relative = path.relative_to(root).as_posix()
        candidate = read_text_file(path, relative, max_bytes)
        yield Document(relative, relative, candidate.text, candidate.skip)


def clean_documents(clean_dir: Path, val_fraction: float) -> Iterator[Document]:
    """The train split of the clean corpus (data/clean): the same documents the tokenizer and the
    model train on, so that nothing held out for evaluation leaks into retrieved context."""
    from tisslm.data.shards import read_shards
    from tisslm.data.tokens import is_val

    if not 0 <= val_fraction < 1:
        raise TissLMError(f"val_fraction={val_fraction}: must be in [0, 1)")
    table = read_shards(clean_dir)
    for doc_id, path, text, train_only in zip(
        table["id"], table["path"], table["text"], table["train_only"], strict=True
    ):
        if not is_val(doc_id, val_fraction, train_only):
            yield Document(doc_id, path, text, None if text.strip() else "empty")


def file_documents(paths: Sequence[Path], max_bytes: int) -> Iterator[Document]:
    """Listed files, keyed and shown by the path as given."""
    from tisslm.data.ingest import read_text_file

    for path in paths:
        candidate = read_text_file(Path(path), str(path), max_bytes)
        yield Document(str(path), str(path), candidate.text, candidate.skip)

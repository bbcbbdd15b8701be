"""Ingest: read every configured source into one document table, accounting for every skip.

Every document a source offers is either kept or skipped for a named reason, so that
`seen == kept + sum(skipped)` always holds and nothing disappears silently. One bad file never
stops the stage.
"""

from __future__ import annotations

import json
import platform
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pathspec
import pyarrow.parquet as pq
from tqdm import tqdm

from tisslm.core.config import DirSource, FilesSource, HFSource, IngestParams, Source, StdlibSource
from tisslm.core.errors import TissLMError
from tisslm.core.hub import require_hub
from tisslm.data.shards import COLUMNS, doc_id, text_sha256

STDLIB_TEST_DIRS = {"test", "tests", "idle_test"}
STDLIB_EXCLUDED_DIRS = {"site-packages", "__pycache__"}


@dataclass
class Candidate:
    """A document a source offers: its text, or the reason it cannot be had."""

    path: str
    text: str | None = None
    skip: str | None = None  # not_utf8, binary, empty, too_large, unreadable, broken_symlink, missing, bad_record


@dataclass
class IngestReport:
    seen: int = 0
    kept: int = 0
    bytes_kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "seen": self.seen,
            "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_total": sum(self.skipped.values()),
            "bytes_kept": self.bytes_kept,
            "by_source": self.by_source,
            "skipped_examples": self.skipped_examples,
        }


def read_text_file(path: Path, display: str, max_bytes: int) -> Candidate:
    """Read one file as UTF-8 text, or say why not."""
    if path.is_symlink() and not path.exists():
        return Candidate(display, skip="broken_symlink")
    try:
        if path.stat().st_size > max_bytes:
            return Candidate(display, skip="too_large")
        data = path.read_bytes()
    except FileNotFoundError:
        return Candidate(display, skip="missing")
    except OSError:
        return Candidate(display, skip="unreadable")
    return text_candidate(display, data, max_bytes)


def text_candidate(display: str, data: bytes, max_bytes: int) -> Candidate:
    if len(data) > max_bytes:
        return Candidate(display, skip="too_large")
    if b"\x00" in data:
        return Candidate(display, skip="binary")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return Candidate(display, skip="not_utf8")
    if not text.strip():
        return Candidate(display, skip="empty")
    return Candidate(display, text=text)


def record_candidate(display: str, record: object, text_field: str, max_bytes: int) -> Candidate:
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        return Candidate(display, skip="bad_record")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, as JSON's "\ud800" allows
        return Candidate(display, skip="not_utf8")
    return text_candidate(display, data, max_bytes)


def stdlib_files(part: str) -> tuple[Path, list[Path]]:
    """The standard library's .py files: those outside its test directories (part "library"), or inside."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        directories = set(path.relative_to(root).parts[:-1])
        if not directories & STDLIB_EXCLUDED_DIRS and bool(directories & STDLIB_TEST_DIRS) == (part == "tests"):
            files.append(path)
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def dir_files(source: DirSource) -> tuple[Path, list[Path]]:
    root = source.path
    if not root.is_dir():
        raise TissLMError(f"ingest.sources: dir {root}: not a directory")
    include = pathspec.PathSpec.from_lines("gitignore", source.include)
    exclude = pathspec.PathSpec.from_lines("gitignore", source.exclude)
    files = []
    for path in root.rglob("*"):
        relative = path.relative_to(root).as_posix()
        is_file_like = path.is_file() or (path.is_symlink() and not path.exists())
        if is_file_like and include.match_file(relative) and not exclude.match_file(relative):
            files.append(path)
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def jsonl_candidates(path: Path, text_field: str, max_bytes: int) -> Iterator[Candidate]:
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            display = f"{path}#L{number}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                yield Candidate(display, skip="bad_record")
                continue
            yield record_candidate(display, record, text_field, max_bytes)


def parquet_candidates(path: Path, text_field: str, max_bytes: int) -> Iterator[Candidate]:
    table = pq.read_table(path)
    if text_field not in table.column_names:
        yield Candidate(str(path), skip="bad_record")
        return
    for row, text in enumerate(table.column(text_field).to_pylist()):
        yield record_candidate(f"{path}#row{row}", {text_field: text}, text_field, max_bytes)


def files_candidates(source: FilesSource, max_bytes: int) -> Iterator[Candidate]:
    for path in source.paths:
        suffix = path.suffix.lower()
        if suffix not in (".jsonl", ".parquet"):
            yield read_text_file(path, str(path), max_bytes)
            continue
        if not path.exists():
            yield Candidate(str(path), skip="broken_symlink" if path.is_symlink() else "missing")
            continue
        reader = jsonl_candidates if suffix == ".jsonl" else parquet_candidates
        try:
            # A file that breaks mid-way keeps what it yielded so far; the rest counts as one skip.
            yield from reader(path, source.text_field, max_bytes)
        except Exception:
            yield Candidate(str(path), skip="unreadable")


def hf_candidates(source: HFSource, max_bytes: int) -> Iterator[Candidate]:
    require_hub(source.name, where="ingest.sources")
    try:
        stream = datasets.load_dataset(
            source.name, source.config_name, data_files=source.data_files, split=source.split, streaming=True
        )
        for index, record in enumerate(stream):
            if source.max_docs is not None and index >= source.max_docs:
                break
            yield record_candidate(f"{source.name}/{source.split}/{index}", record, source.text_field, max_bytes)
    except (ConnectionError, OSError, ValueError, FileNotFoundError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TissLMError(f"ingest.sources: hf {source.name!r}: cannot load ({first_line})") from None


def source_name(source: Source) -> str:
    if isinstance(source, StdlibSource):
        return "stdlib" if source.part == "library" else "stdlib-tests"
    if isinstance(source, DirSource):
        return f"dir:{source.path}"
    if isinstance(source, FilesSource):
        return "files"
    return f"hf:{source.name}"


def describe_source(source: Source) -> str:
    """A source in words, for the model card and datasheet."""
    return describe_documents(source) + (" (train split only)" if source.train_only else "")


def describe_documents(source: Source) -> str:
    if isinstance(source, StdlibSource) and source.part == "tests":
        return f"the test suites of Python {platform.python_version()}'s standard library"
    if isinstance(source, StdlibSource):
        return f"the standard library of Python {platform.python_version()} (tests and site-packages excluded)"
    if isinstance(source, DirSource):
        return f"files under {source.path.name or source.path} ({', '.join(source.include)})"
    if isinstance(source, FilesSource):
        return f"the listed files {', '.join(p.name for p in source.paths)}"
    return f"the dataset {source.name} ({source.split} split)"


def candidates(source: Source, max_bytes: int) -> Iterator[Candidate]:
    if isinstance(source, (StdlibSource, DirSource)):
        root, files = stdlib_files(source.part) if isinstance(source, StdlibSource) else dir_files(source)
        for path in files:
            yield read_text_file(path, path.relative_to(root).as_posix(), max_bytes)
    elif isinstance(source, FilesSource):
        yield from files_candidates(source, max_bytes)
    else:
        yield from hf_candidates(source, max_bytes)


def ingest(params: IngestParams, examples_per_reason: int = 5) -> tuple[datasets.Dataset, IngestReport]:
    """All sources' kept documents as one table (columns COLUMNS), in a deterministic order."""
    report = IngestReport()
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    for source in params.sources:
        name = source_name(source)
        counts = Counter()
        for candidate in tqdm(candidates(source, params.max_file_bytes), desc=f"ingest {name}", unit=" docs"):
            counts["seen"] += 1
            if candidate.skip is not None:
                counts["skipped"] += 1
                report.skipped[candidate.skip] += 1
                report.skipped_examples.setdefault(candidate.skip, [])
                if len(report.skipped_examples[candidate.skip]) < examples_per_reason:
                    report.skipped_examples[candidate.skip].append(f"{name}:{candidate.path}")
                continue
            data = candidate.text.encode("utf-8")
            counts["kept"] += 1
            rows["id"].append(doc_id(name, candidate.path))
            rows["source"].append(name)
            rows["path"].append(candidate.path)
            rows["text"].append(candidate.text)
            rows["n_bytes"].append(len(data))
            rows["sha256"].append(text_sha256(candidate.text))
            rows["train_only"].append(source.train_only)
            report.bytes_kept += len(data)
        report.seen += counts["seen"]
        report.kept += counts["kept"]
        report.by_source[name] = {
            "description": describe_source(source),
            "seen": counts["seen"],
            "kept": counts["kept"],
            "skipped": counts["skipped"],
        }
    return datasets.Dataset.from_dict(rows), report

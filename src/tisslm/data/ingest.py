"""Ingest: read every configured source into one document table, accounting for every skip.

Every document a source offers is either kept or skipped for a named reason, so that
`seen == kept + sum(skipped)` always holds and nothing disappears silently. One bad file never
stops the stage.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import site
import sysconfig
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pathspec
import pyarrow.parquet as pq
from packaging.utils import canonicalize_name
from tqdm import tqdm

from tisslm.core.config import (
    DirSource,
    FilesSource,
    HFSource,
    IngestParams,
    SitePackagesSource,
    Source,
    StdlibSource,
)
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
    skip: str | None = None  # not_utf8, binary, empty, too_large, unreadable, broken_symlink, missing, bad_record,
    # license_excluded (site_packages)
    license: str | None = None  # the distribution's license (site_packages sources only)
    size: int = 0  # bytes on disk of a license_excluded file


@dataclass
class IngestReport:
    seen: int = 0
    kept: int = 0
    bytes_kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    # site_packages sources only: per license, files (and bytes) included (kept), excluded (license_excluded),
    # skipped for another reason, and the distributions ("name==version") under it.
    licenses: dict[str, dict] = field(default_factory=dict)

    def count_license(self, candidate: Candidate) -> None:
        entry = self.licenses.setdefault(
            candidate.license,
            {
                "included": 0,
                "excluded": 0,
                "skipped": 0,
                "included_bytes": 0,
                "excluded_bytes": 0,
                "distributions": set(),
            },
        )
        entry["distributions"].add(candidate.path.split("/", 1)[0])
        if candidate.skip is None:
            entry["included"] += 1
            entry["included_bytes"] += len(candidate.text.encode("utf-8"))
        elif candidate.skip == "license_excluded":
            entry["excluded"] += 1
            entry["excluded_bytes"] += candidate.size
        else:
            entry["skipped"] += 1

    def to_json(self) -> dict:
        report = {
            "seen": self.seen,
            "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_total": sum(self.skipped.values()),
            "bytes_kept": self.bytes_kept,
            "by_source": self.by_source,
            "skipped_examples": self.skipped_examples,
        }
        if self.licenses:  # only with a site_packages source: the default report stays as it was
            report["licenses"] = {
                name: {**entry, "distributions": sorted(entry["distributions"])}
                for name, entry in sorted(self.licenses.items())
            }
        return report


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


# SPDX-like names, and the trove classifiers' and free-text License fields' names (lowercased, "|"-separated)
# that mean them.
_LICENSE_NAMES = {
    "MIT": "mit|mit license|mit licence|the mit license (mit)|expat",
    "Apache-2.0": (
        "apache|apache 2|apache 2.0|apache-2|apache-2.0|apache license|apache license 2.0|apache license, version 2.0"
        "|apache license version 2.0|apache software license|apache 2.0 license|asl 2.0"
    ),
    "BSD": "bsd|bsd license|bsd licence",
    "BSD-3-Clause": (
        "bsd-3-clause|bsd 3-clause|bsd 3-clause license|3-clause bsd|3-clause bsd license|new bsd|new bsd license"
        "|modified bsd|modified bsd license|revised bsd license"
    ),
    "BSD-2-Clause": "bsd-2-clause|bsd 2-clause|bsd 2-clause license|2-clause bsd|simplified bsd",
    "PSF-2.0": "psf|psfl|psf-2.0|psf license|python software foundation license",
    "ISC": "isc|isc license|isc license (iscl)|iscl",
    "MPL-2.0": "mpl-2.0|mpl 2.0|mozilla public license 2.0 (mpl 2.0)",
    "Unlicense": "unlicense|the unlicense|the unlicense (unlicense)",
    "Zlib": "zlib|zlib/libpng license",
    "HPND": "historical permission notice and disclaimer (hpnd)",
    "CC0-1.0": "cc0 1.0 universal (cc0 1.0) public domain dedication",
    "GPL-2.0-only": "gnu general public license v2 (gplv2)",
    "GPL-2.0-or-later": "gnu general public license v2 or later (gplv2+)",
    "GPL-3.0-only": "gnu general public license v3 (gplv3)",
    "GPL-3.0-or-later": "gnu general public license v3 or later (gplv3+)",
    "LGPL-2.0-only": "gnu lesser general public license v2 (lgplv2)",
    "LGPL-2.0-or-later": "gnu lesser general public license v2 or later (lgplv2+)",
    "LGPL-3.0-only": "gnu lesser general public license v3 (lgplv3)",
    "LGPL-3.0-or-later": "gnu lesser general public license v3 or later (lgplv3+)",
    "AGPL-3.0-only": "gnu affero general public license v3",
    "EPL-2.0": "eclipse public license 2.0 (epl-2.0)",
    "Proprietary": "other/proprietary license",
}
LICENSE_ALIASES = {alias: name for name, aliases in _LICENSE_NAMES.items() for alias in aliases.split("|")}
UNSPECIFIC_CLASSIFIERS = {"License :: OSI Approved", "License :: DFSG approved"}
SHORT_LICENSE_FIELD = 60  # longer License fields (whole license texts) name a license only in their first line


def normalize_license(metadata) -> str:
    """One name for a distribution's license: its License-Expression, else its license trove classifiers
    (several are joined with AND, which only allows the union when each is allowed), else a short License
    field (or a long one's first line when that names a license), else "unknown"."""
    expression = " ".join((metadata.get("License-Expression") or "").split())
    if expression:
        return expression
    named = sorted(
        {
            LICENSE_ALIASES.get(c.rsplit("::", 1)[-1].strip().lower(), c.rsplit("::", 1)[-1].strip())
            for c in metadata.get_all("Classifier") or []
            if c.startswith("License ::") and " ".join(c.split()) not in UNSPECIFIC_CLASSIFIERS
        }
    )
    if named:
        return " AND ".join(named)
    text = (metadata.get("License") or "").strip()
    first_line = text.splitlines()[0].strip() if text else ""
    if first_line.lower() in LICENSE_ALIASES:
        return LICENSE_ALIASES[first_line.lower()]
    if text and "\n" not in text and len(text) <= SHORT_LICENSE_FIELD and text.lower() != "unknown":
        return " ".join(text.split())
    return "unknown"


def license_allowed(license: str, allowed: Iterable[str]) -> bool:
    """Whether `license` (a name, or an SPDX expression as `license-expression` parses it) holds under
    the allow-list: listed as a whole, or an expression whose OR has an allowed side and whose AND has
    every side allowed (X WITH an exception counts as X, or as itself when listed whole)."""
    from license_expression import ExpressionError, LicenseWithExceptionSymbol, Licensing

    allowed = {name.lower() for name in allowed}
    if license.lower() in allowed:
        return True
    licensing = Licensing()
    try:
        expression = licensing.parse(license)
    except ExpressionError:
        return False
    if expression is None:
        return False

    def holds(symbol) -> bool:
        if isinstance(symbol, LicenseWithExceptionSymbol):
            return str(symbol).lower() in allowed or symbol.license_symbol.key.lower() in allowed
        return symbol.key.lower() in allowed

    values = {symbol: licensing.TRUE if holds(symbol) else licensing.FALSE for symbol in expression.symbols}
    return expression.subs(values).simplify() == licensing.TRUE


@dataclass(frozen=True)
class PackageFile:
    """One .py file of an installed distribution."""

    display: str  # "{name}=={version}/{path relative to the site directory}"
    path: Path
    license: str
    allowed: bool


def site_directories() -> list[Path]:
    """This environment's site-packages directories (and the user's, when enabled), as `site` names them."""
    found = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        found.append(site.getusersitepackages())
    return [Path(p) for p in dict.fromkeys(found) if Path(p).is_dir()]


def installed_distributions(paths: Sequence[str | Path] | None = None) -> list[importlib.metadata.Distribution]:
    """The distributions under `paths` (None: this environment's site-packages), in search-path order and
    by name within a path; one found again under the same name later is shadowed, as for imports."""
    found, names = [], set()
    for directory in site_directories() if paths is None else paths:
        for dist in sorted(
            importlib.metadata.distributions(path=[str(directory)]),
            key=lambda d: (canonicalize_name(d.metadata["Name"] or ""), d.version or "", str(d.locate_file(""))),
        ):
            name = canonicalize_name(dist.metadata["Name"] or "")
            if name and name not in names:
                names.add(name)
                found.append(dist)
    return found


def site_packages_files(
    allowed: Iterable[str], *, paths: Sequence[str | Path] | None = None, exclude_tests: bool = True
) -> list[PackageFile]:
    """The .py files the installed distributions list in their RECORD (under `paths`, None: this environment's
    site-packages), each with its distribution's license and whether the allow-list takes it; sorted by display
    path. A file listed by two distributions belongs to the first; files outside the site directory (scripts)
    are left out, and with `exclude_tests` those under test/ and tests/ directories."""
    allowed = list(allowed)
    owners: set[str] = set()
    files = []
    for dist in installed_distributions(paths):
        license = normalize_license(dist.metadata)
        take = license_allowed(license, allowed)
        prefix = f"{dist.metadata['Name']}=={dist.version}"
        for record in dist.files or []:
            parts = record.parts
            if record.suffix != ".py" or ".." in parts or Path(*parts).is_absolute():
                continue
            if exclude_tests and set(parts[:-1]) & STDLIB_TEST_DIRS:
                continue
            located = Path(os.path.normpath(dist.locate_file(record)))
            if str(located) in owners:
                continue
            owners.add(str(located))
            files.append(PackageFile(f"{prefix}/{'/'.join(parts)}", located, license, take))
    return sorted(files, key=lambda f: f.display)


def site_packages_candidates(source: SitePackagesSource, max_bytes: int) -> Iterator[Candidate]:
    files = site_packages_files(source.licenses, paths=source.paths, exclude_tests=source.exclude_tests)
    for file in files:
        if not file.allowed:
            try:
                size = file.path.stat().st_size
            except OSError:
                size = 0
            yield Candidate(file.display, skip="license_excluded", license=file.license, size=size)
            continue
        candidate = read_text_file(file.path, file.display, max_bytes)
        candidate.license = file.license
        yield candidate


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
    if isinstance(source, SitePackagesSource):
        return "site-packages"
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
    if isinstance(source, SitePackagesSource):
        where = "this environment" if source.paths is None else ", ".join(str(p) for p in source.paths)
        tests = ", tests excluded" if source.exclude_tests else ""
        return (
            f"the .py files of the {len(installed_distributions(source.paths))} installed distributions of {where}"
            f" (licenses: {', '.join(source.licenses)}{tests})"
        )
    return f"the dataset {source.name} ({source.split} split)"


def candidates(source: Source, max_bytes: int) -> Iterator[Candidate]:
    if isinstance(source, (StdlibSource, DirSource)):
        root, files = stdlib_files(source.part) if isinstance(source, StdlibSource) else dir_files(source)
        for path in files:
            yield read_text_file(path, path.relative_to(root).as_posix(), max_bytes)
    elif isinstance(source, FilesSource):
        yield from files_candidates(source, max_bytes)
    elif isinstance(source, SitePackagesSource):
        yield from site_packages_candidates(source, max_bytes)
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
            if candidate.license is not None:
                report.count_license(candidate)
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

"""The on-disk index: one SQLite database, DIR/index.sqlite, holding documents, chunks, an FTS5
full-text index and the chunks' vectors.

One file makes the index one thing to copy, cache (DVC) and update atomically: the writer applies
a whole build in one transaction and WAL mode lets readers keep searching the previous snapshot
meanwhile, so a reader sees the index before a build or after it, never half of one.

FTS5 tokenizes with `unicode61 tokenchars '_'` so that `raw_decode` stays one token, wrapped in the
Porter stemmer so that "parsing" finds `parse`. The FTS table has five fields, weighted apart at
search time (index.py): the chunk's qualified name with its identifiers' words (`hashlib.file_digest
file digest`), the definition's signature and its docstring (each with their identifiers' words), the
text, and `terms`, the words of every compound identifier in the text (`raw_decode` -> `raw decode`,
`JSONDecoder` -> `json decoder`), so a question in plain words still reaches snake_case and
CamelCase code. `term_df` counts the chunks holding each indexed term, recounted by every build, so
that a search can skip words common enough to be slow and uninformative. `is_test` marks chunks of
test files (`is_test_path`), which a search can down-weight or leave out. `semantic` holds the
MiniLM vectors that rerank files (index.py): a document's card and each of its documented definitions.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from tisslm.core.errors import TissLMError

INDEX_FILE = "index.sqlite"
FORMAT = "tisslm-kb"
FORMAT_VERSION = 3  # 2: name, signature, doc, text, terms fields; is_test; deprecated. 3: semantic vectors
TOKENIZE = "porter unicode61 tokenchars '_'"
FIELDS = ("name", "signature", "doc", "text", "terms")
# A test file: under a test(s)/ or idle_test/ directory, or named test_*.py, *_test.py, conftest.py.
TEST_PATH = re.compile(r"(^|/)(tests?|idle_test|testing)/|(^|/)(test_[^/]*|[^/]*_test|conftest)\.pyi?$")

SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE documents (
    key TEXT PRIMARY KEY,      -- the source's identity for the document (relative path, clean id)
    path TEXT NOT NULL,        -- what a hit shows
    sha256 TEXT NOT NULL,      -- of the document's text as read: unchanged hash, nothing to do
    n_bytes INTEGER NOT NULL,
    n_chunks INTEGER NOT NULL,
    deprecated INTEGER NOT NULL  -- 1: the module warns that it is deprecated when imported (DEPRECATED)
);
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY,
    document TEXT NOT NULL REFERENCES documents(key),
    path TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    start_line INTEGER NOT NULL,
    end_line INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    text TEXT NOT NULL,        -- after anonymization: nothing secret is stored
    signature TEXT NOT NULL,   -- a definition's header lines ('' for other chunks), anonymized
    doc TEXT NOT NULL,         -- its docstring, anonymized
    is_test INTEGER NOT NULL,  -- 1 for a chunk of a test file (TEST_PATH)
    name_terms TEXT NOT NULL,  -- the FTS fields, for full-text search only: name + its identifiers' words,
    signature_terms TEXT NOT NULL,  -- signature + its identifiers' words,
    doc_terms TEXT NOT NULL,   -- docstring + its identifiers' words,
    terms TEXT NOT NULL,       -- and the words of the text's compound identifiers
    vector BLOB NOT NULL       -- float16, unit length
);
CREATE INDEX chunks_document ON chunks(document);
CREATE TABLE semantic (        -- the reranker's MiniLM vectors (semantic.py), one row a document (a search
    document TEXT PRIMARY KEY REFERENCES documents(key),  -- reads its candidates' in one fetch), apart from
    vectors BLOB NOT NULL      -- the chunks: float16, unit length, the card's then each documented definition's
);
CREATE TABLE term_df (term TEXT PRIMARY KEY, df INTEGER NOT NULL) WITHOUT ROWID;  -- chunks holding each term
CREATE VIRTUAL TABLE chunks_fts USING fts5(
    name_terms, signature_terms, doc_terms, text, terms, content='chunks', content_rowid='id', tokenize="{TOKENIZE}"
);
CREATE TRIGGER chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, name_terms, signature_terms, doc_terms, text, terms)
    VALUES (new.id, new.name_terms, new.signature_terms, new.doc_terms, new.text, new.terms);
END;
CREATE TRIGGER chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, name_terms, signature_terms, doc_terms, text, terms)
    VALUES ('delete', old.id, old.name_terms, old.signature_terms, old.doc_terms, old.text, old.terms);
END;
"""

# A module that warns it is deprecated when imported: a top-level `warnings.warn(..., DeprecationWarning)`
# or `warnings._deprecated(...)` (distutils, lib2to3, asyncore, cgi, ... in Python 3.11).
DEPRECATED = re.compile(
    r"^(?:_?warnings\._deprecated\(|_deprecated\(|_?warnings\.warn\((?:[^\n]*\n?){0,4}?[^\n]*\b(?:Pending)?DeprecationWarning)",
    re.MULTILINE,
)
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CAMEL_PART = re.compile(r"[A-Z]+(?=[A-Z][a-z]|\d|\b)|[A-Z]?[a-z]+|[A-Z]+|\d+")


def split_identifier(identifier: str) -> list[str]:
    """`raw_decode` -> [raw, decode]; `JSONDecoder` -> [json, decoder]; `parse` -> [] (nothing to add)."""
    parts = [p.lower() for piece in identifier.split("_") for p in CAMEL_PART.findall(piece)]
    return parts if len(parts) > 1 else []


def identifier_terms(text: str) -> str:
    """The words inside the compound identifiers of `text`, in order (term frequency kept)."""
    return " ".join(word for ident in IDENTIFIER.findall(text) for word in split_identifier(ident))


def with_identifier_words(text: str) -> str:
    """`text` followed by the words of its compound identifiers: a field matched by `file_digest`
    and by "file digest" alike."""
    words = identifier_terms(text)
    return f"{text} {words}" if words else text


def is_test_path(path: str) -> bool:
    """Is `path` a test file? (`test/test_csv.py`, `pkg/tests/x.py`, `test_x.py`, `x_test.py`, `conftest.py`;
    not `unittest/case.py` or `doctest.py`, which are library code about testing.)"""
    return TEST_PATH.search(path) is not None


def covered_paths(path: str) -> list[str]:
    """The library files a test file most likely tests, best first, by the usual layout:
    `test/test_shutil.py` -> `shutil.py`; `test/test_email/test_utils.py` -> `email/utils.py`, then
    the package its test directory names (`email.py`, `email/__init__.py`); `pkg/tests/test_io.py`
    -> `pkg/io.py`. A stem ends at a name marked as a test's (`test_x`, `x_test`), so a test of
    no such name (`unittest/test/support.py`) tests nothing in particular. Empty for a non-test."""
    if not is_test_path(path):
        return []
    parts: list[tuple[str, bool]] = []  # (name with its test marker removed, whether it had one)
    for part in path.rsplit(".", 1)[0].split("/"):
        name = part.removeprefix("test_").removesuffix("_test")
        if part not in ("test", "tests", "idle_test", "testing") and name:
            parts.append((name, name != part))
    stems = ["/".join(name for name, _ in parts[:end]) for end in range(len(parts), 0, -1) if parts[end - 1][1]]
    return [candidate for stem in stems for candidate in (f"{stem}.py", f"{stem}/__init__.py")]


def is_deprecated_module(path: str, text: str) -> bool:
    """Does the Python module warn at import that it is deprecated (DEPRECATED)? A deprecated
    package's `__init__.py` makes every module under it deprecated (see KnowledgeBase)."""
    return path.endswith((".py", ".pyi")) and DEPRECATED.search(text) is not None


def refresh_term_df(conn: sqlite3.Connection) -> None:
    """Recount how many chunks hold each indexed term (inside the writer's transaction), so that a
    search can leave out the terms common enough to cost more than they tell (see index.py)."""
    conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.chunks_vocab USING fts5vocab(main, chunks_fts, 'row')")
    conn.execute("DELETE FROM term_df")
    conn.execute("INSERT INTO term_df SELECT term, doc FROM temp.chunks_vocab")


def index_path(directory: Path) -> Path:
    return Path(directory) / INDEX_FILE


def connect(path: Path, readonly: bool) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) that waits for a busy writer."""
    if readonly:
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def read_meta(conn: sqlite3.Connection, path: Path) -> dict[str, str]:
    """The index's metadata, or a one-line error if `path` is not a TissLM knowledge base."""
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as err:  # "file is not a database", "no such table: meta", ...
        raise TissLMError(f"{path}: not a TissLM knowledge base ({err})") from None
    if meta.get("format") != FORMAT:
        raise TissLMError(f"{path}: not a TissLM knowledge base (its meta table has no format={FORMAT!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise TissLMError(
            f"{path}: knowledge base format {meta.get('format_version')}, this TissLM reads {FORMAT_VERSION}: rebuild it"
        )
    return meta


def open_for_reading(directory: Path) -> tuple[sqlite3.Connection, dict[str, str]]:
    path = index_path(directory)
    if not path.is_file():
        raise TissLMError(f"{path}: no knowledge base here (build one with `tisslm kb build --out {directory}`)")
    conn = connect(path, readonly=True)
    try:
        return conn, read_meta(conn, path)
    except TissLMError:
        conn.close()
        raise


def _older_format(conn: sqlite3.Connection) -> bool:
    """Is this a TissLM knowledge base of an earlier format (rebuilt, not refused, by a build)?"""
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError:
        return False
    version = meta.get("format_version", "")
    return meta.get("format") == FORMAT and version.isdigit() and int(version) < FORMAT_VERSION


def open_for_writing(directory: Path) -> tuple[sqlite3.Connection, dict[str, str]]:
    """The index in `directory`, created if absent; an existing file that is not one is an error
    (never overwritten: it may be someone's data). An index of an earlier format is emptied and
    recreated in one transaction (readers see the old one until the build commits its documents)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise TissLMError(f"{directory}: not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    path = index_path(directory)
    fresh = not path.exists()
    conn = connect(path, readonly=False)
    try:
        identity = (
            f"INSERT INTO meta VALUES ('format', '{FORMAT}'), ('format_version', '{FORMAT_VERSION}'),"
            " ('generation', '0');"
        )
        if fresh:
            conn.execute("PRAGMA journal_mode = WAL")
            # one transaction: the schema and its identity appear together
            conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA}{identity} COMMIT;")
        elif _older_format(conn):
            tables = conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
                " AND name NOT LIKE 'chunks_fts_%'"
            ).fetchall()
            drops = "".join(f'DROP TABLE IF EXISTS "{name}";' for (name,) in tables)
            # The generation keeps counting up, so that an open reader reloads its vectors.
            (generation,) = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone() or ("0",)
            identity = identity.replace("('generation', '0')", f"('generation', '{int(generation)}')")
            conn.executescript(f"BEGIN IMMEDIATE; {drops}{SCHEMA}{identity} COMMIT;")
        return conn, read_meta(conn, path)
    except TissLMError:
        conn.close()
        raise

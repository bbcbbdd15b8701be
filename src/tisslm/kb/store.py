"""The on-disk index: one SQLite database, DIR/index.sqlite, holding documents, chunks, an FTS5
full-text index and the chunks' vectors.

One file makes the index one thing to copy, cache (DVC) and update atomically: the writer applies
a whole build in one transaction and WAL mode lets readers keep searching the previous snapshot
meanwhile, so a reader sees the index before a build or after it, never half of one.

FTS5 tokenizes with `unicode61 tokenchars '_'` so that `raw_decode` stays one token, wrapped in the
Porter stemmer so that "parsing" finds `parse`. Identifiers are also split into their words
(`raw_decode` -> `raw decode`, `JSONDecoder` -> `json decoder`) in a third column, `terms`, so a
question in plain words still reaches snake_case and CamelCase code. `term_df` counts the chunks
holding each indexed term, recounted by every build, so that a search can skip words common enough
to be slow and uninformative.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from tisslm.core.errors import TissLMError

INDEX_FILE = "index.sqlite"
FORMAT = "tisslm-kb"
FORMAT_VERSION = 1
TOKENIZE = "porter unicode61 tokenchars '_'"
# bm25() weights of the FTS columns (name, text, terms): a match in a chunk's name counts most.
COLUMN_WEIGHTS = (4.0, 1.0, 1.0)

SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE documents (
    key TEXT PRIMARY KEY,      -- the source's identity for the document (relative path, clean id)
    path TEXT NOT NULL,        -- what a hit shows
    sha256 TEXT NOT NULL,      -- of the document's text as read: unchanged hash, nothing to do
    n_bytes INTEGER NOT NULL,
    n_chunks INTEGER NOT NULL
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
    terms TEXT NOT NULL,       -- the identifiers' words, for full-text search only
    vector BLOB NOT NULL       -- float16, unit length
);
CREATE INDEX chunks_document ON chunks(document);
CREATE TABLE term_df (term TEXT PRIMARY KEY, df INTEGER NOT NULL) WITHOUT ROWID;  -- chunks holding each term
CREATE VIRTUAL TABLE chunks_fts USING fts5(
    name, text, terms, content='chunks', content_rowid='id', tokenize="{TOKENIZE}"
);
CREATE TRIGGER chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, name, text, terms) VALUES (new.id, new.name, new.text, new.terms);
END;
CREATE TRIGGER chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, name, text, terms) VALUES ('delete', old.id, old.name, old.text, old.terms);
END;
"""

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CAMEL_PART = re.compile(r"[A-Z]+(?=[A-Z][a-z]|\d|\b)|[A-Z]?[a-z]+|[A-Z]+|\d+")


def split_identifier(identifier: str) -> list[str]:
    """`raw_decode` -> [raw, decode]; `JSONDecoder` -> [json, decoder]; `parse` -> [] (nothing to add)."""
    parts = [p.lower() for piece in identifier.split("_") for p in CAMEL_PART.findall(piece)]
    return parts if len(parts) > 1 else []


def identifier_terms(text: str) -> str:
    """The words inside the compound identifiers of `text`, in order (term frequency kept)."""
    return " ".join(word for ident in IDENTIFIER.findall(text) for word in split_identifier(ident))


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


def open_for_writing(directory: Path) -> tuple[sqlite3.Connection, dict[str, str]]:
    """The index in `directory`, created if absent; an existing file that is not one is an error
    (never overwritten: it may be someone's data)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise TissLMError(f"{directory}: not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    path = index_path(directory)
    fresh = not path.exists()
    conn = connect(path, readonly=False)
    try:
        if fresh:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(  # one transaction: the schema and its identity appear together
                f"BEGIN IMMEDIATE; {SCHEMA}"
                f"INSERT INTO meta VALUES ('format', '{FORMAT}'), ('format_version', '{FORMAT_VERSION}'),"
                " ('generation', '0'); COMMIT;"
            )
        return conn, read_meta(conn, path)
    except TissLMError:
        conn.close()
        raise

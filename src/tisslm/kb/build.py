"""Build or update a knowledge base: read the sources, chunk, anonymize, embed (WordLlama for every chunk,
MiniLM for what says what a file is for), and apply the difference to the index in one transaction.

Incremental by document hash: a document whose text hashes as it did last time costs a hash and
nothing else (no chunking, no anonymizing, no embedding), one whose hash changed is re-chunked,
new ones are added and documents no source offers any more are removed. A change of chunker or
of either embedding model makes every document "updated", since old and new chunks or vectors must not mix.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tisslm.core.config import AnonymizeParams, IngestParams, TokenizeParams
from tisslm.core.errors import TissLMError
from tisslm.data.anonymize import anonymize
from tisslm.kb import embed, semantic
from tisslm.kb.chunk import CHUNKER_VERSION, Chunk, chunk_document
from tisslm.kb.index import Ranking
from tisslm.kb.sources import Document, clean_documents, directory_documents, file_documents
from tisslm.kb.store import (
    identifier_terms,
    index_path,
    is_deprecated_module,
    is_test_path,
    open_for_writing,
    refresh_term_df,
    with_identifier_words,
)

DEFAULT_INCLUDE = ("**/*.py", "**/*.md", "**/*.rst", "**/*.txt")
EXAMPLES_PER_REASON = 5


@dataclass
class Prepared:
    """A changed or new document, chunked, anonymized and embedded, ready to be written."""

    document: Document
    sha256: str
    chunks: list[Chunk]
    vectors: np.ndarray | None = None  # (chunks, embed.DIM) float32
    card: np.ndarray | None = None  # (semantic.DIM,) the MiniLM vector of card_text
    definitions: np.ndarray | None = None  # (documented definitions, semantic.DIM): of definition_text


def card_text(path: str, chunks: Sequence[Chunk]) -> str:
    """What the reranker reads to tell what a file is for: its path and its module docstring."""
    return f"{path}: {next((c.doc for c in chunks if c.kind == 'module'), '')}"


def definition_text(chunk: Chunk) -> str:
    """A documented definition as the reranker reads it: its name and its docstring's first paragraph."""
    return f"{chunk.name}: {chunk.doc.split(chr(10) * 2)[0]}"


def _documented(chunks: Sequence[Chunk]) -> list[Chunk]:
    return [c for c in chunks if c.doc and c.kind != "module"]


def _sources(
    directory: Path | None,
    include: Sequence[str],
    exclude: Sequence[str],
    clean: Path | None,
    val_fraction: float,
    files: Sequence[Path],
    max_file_bytes: int,
) -> Iterator[Document]:
    if directory is None and clean is None and not files:
        raise TissLMError("build_index: no source (give a directory, a clean corpus or files)")
    if directory is not None:
        yield from directory_documents(Path(directory), include, exclude, max_file_bytes)
    if clean is not None:
        yield from clean_documents(Path(clean), val_fraction)
    yield from file_documents([Path(p) for p in files], max_file_bytes)


def _anonymized_chunks(document: Document, params: AnonymizeParams, redactions: Counter) -> list[Chunk]:
    chunks = []
    for chunk in chunk_document(document.path, document.text):
        text, counts = anonymize(chunk.text, params)
        redactions.update(counts)
        # The signature and docstring are parts of the text: anonymized too, not counted twice.
        signature = anonymize(chunk.signature, params)[0] if chunk.signature else ""
        doc = anonymize(chunk.doc, params)[0] if chunk.doc else ""
        chunks.append(replace(chunk, text=text, signature=signature, doc=doc))
    return chunks


def _embed_all(prepared: list[Prepared], batch_chunks: int, progress: bool) -> None:
    """Embed every chunk of the prepared documents, in batches, with a progress bar."""
    chunks = [(p, i) for p in prepared for i in range(len(p.chunks))]
    vectors = np.zeros((len(chunks), embed.DIM), dtype=np.float32)
    with tqdm(total=len(chunks), desc="kb embed", unit=" chunks", disable=not progress) as bar:
        for start in range(0, len(chunks), batch_chunks):
            batch = chunks[start : start + batch_chunks]
            vectors[start : start + len(batch)] = embed.embed(
                [f"{p.chunks[i].name}\n{p.chunks[i].text}" for p, i in batch]
            )
            bar.update(len(batch))
    offset = 0
    for p in prepared:
        p.vectors = vectors[offset : offset + len(p.chunks)]
        offset += len(p.chunks)


def _encode_semantic(prepared: list[Prepared], progress: bool) -> None:
    """MiniLM vectors of each prepared document's card and documented definitions, with a progress
    bar (about 160 texts/s on two cores for the pipeline's corpus: the slowest part of a build, so
    only these are encoded)."""
    if not prepared:
        return
    semantic.verify_weights()
    documented = [_documented(p.chunks) for p in prepared]
    texts = [
        text
        for p, definitions in zip(prepared, documented, strict=True)
        for text in [card_text(p.document.path, p.chunks), *map(definition_text, definitions)]
    ]
    vectors = np.zeros((len(texts), semantic.DIM), dtype=np.float32)
    step = 1024  # texts per progress update
    with tqdm(total=len(texts), desc="kb semantic", unit=" texts", disable=not progress) as bar:
        for start in range(0, len(texts), step):
            vectors[start : start + step] = semantic.encode(texts[start : start + step])
            bar.update(len(texts[start : start + step]))
    offset = 0
    for p, definitions in zip(prepared, documented, strict=True):
        p.card, p.definitions = vectors[offset], vectors[offset + 1 : offset + 1 + len(definitions)]
        offset += 1 + len(definitions)


def _write(conn, prepared: list[Prepared], removed: Iterable[str], meta: dict[str, str]) -> None:
    """Apply a build to the index in one transaction: readers see all of it or none of it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for key in [*removed, *(p.document.key for p in prepared)]:
            conn.execute("DELETE FROM chunks WHERE document = ?", (key,))
            conn.execute("DELETE FROM semantic WHERE document = ?", (key,))
            conn.execute("DELETE FROM documents WHERE key = ?", (key,))
        for p in prepared:
            doc = p.document
            conn.execute(
                "INSERT INTO documents VALUES (?, ?, ?, ?, ?, ?)",
                (
                    doc.key,
                    doc.path,
                    p.sha256,
                    len(doc.text.encode("utf-8")),
                    len(p.chunks),
                    int(is_deprecated_module(doc.path, doc.text)),
                ),
            )
            is_test = int(is_test_path(doc.path))
            conn.executemany(
                "INSERT INTO chunks (document, path, name, kind, start_line, end_line, sha256, text, signature, doc,"
                " is_test, name_terms, signature_terms, doc_terms, terms, vector)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        doc.key,
                        c.path,
                        c.name,
                        c.kind,
                        c.start_line,
                        c.end_line,
                        c.sha256,
                        c.text,
                        c.signature,
                        c.doc,
                        is_test,
                        with_identifier_words(c.name),
                        with_identifier_words(c.signature),
                        with_identifier_words(c.doc),
                        identifier_terms(c.text),
                        v.astype(np.float16).tobytes(),
                    )
                    for c, v in zip(p.chunks, p.vectors, strict=True)
                ],
            )
            conn.execute(
                "INSERT INTO semantic (document, vectors) VALUES (?, ?)",
                (doc.key, np.vstack([p.card, p.definitions]).astype(np.float16).tobytes()),
            )
        refresh_term_df(conn)
        generation = int(conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]) + 1
        conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [*meta.items(), ("generation", str(generation))])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def build_index(
    out: Path,
    *,
    directory: Path | None = None,
    include: Sequence[str] = DEFAULT_INCLUDE,
    exclude: Sequence[str] = (),
    clean: Path | None = None,
    val_fraction: float = TokenizeParams().val_fraction,
    files: Sequence[Path] = (),
    max_file_bytes: int = IngestParams().max_file_bytes,
    anonymize_params: AnonymizeParams | None = None,
    batch_chunks: int = 512,
    progress: bool = True,
    index_tests: bool = True,
    ranking: Ranking | None = None,
) -> dict:
    """Create or update the knowledge base in directory `out` from the given sources, and report.

    Sources (any combination, at least one): `directory` with gitignore-style `include`/`exclude`
    globs relative to it; `clean`, a clean-corpus directory (data/clean) of which only the train
    split for `val_fraction` is indexed; `files`, a list of files. The index ends up holding exactly
    the documents the sources offer now. Returns documents and chunks in the index, the counts
    added / updated / removed / unchanged, chunks embedded, skipped files by reason, redactions by
    type, the bytes read for changed documents, and seconds.

    `index_tests=False` leaves test files (store.is_test_path) out, skipped as "test"; indexed, a
    search down-weights them (Ranking.test_weight). `ranking` is stored in the index as the ranking
    its searches use by default (None keeps the one stored, or index.DEFAULT_RANKING).
    """
    started = time.perf_counter()
    params = anonymize_params or AnonymizeParams()
    conn, meta = open_for_writing(Path(out))
    try:
        model = embed.model_name()
        stale = (
            meta.get("chunker_version") != str(CHUNKER_VERSION)
            or meta.get("embedding_model") != model
            or meta.get("semantic_model") != semantic.MODEL_NAME
        )
        known = dict(conn.execute("SELECT key, sha256 FROM documents").fetchall())
        if stale:  # chunks of another chunker or vectors of another model: no hash may match
            known = dict.fromkeys(known, "")

        counts, skipped, redactions = Counter(), Counter(), Counter()
        examples: dict[str, list[str]] = {}
        seen: set[str] = set()
        prepared: list[Prepared] = []
        bytes_read = 0
        documents = _sources(directory, include, exclude, clean, val_fraction, files, max_file_bytes)
        for doc in tqdm(documents, desc="kb read", unit=" docs", disable=not progress):
            skip = doc.skip or ("duplicate" if doc.key in seen else None)
            if skip is None and not index_tests and is_test_path(doc.path):
                skip = "test"
            if skip is not None:
                skipped[skip] += 1
                if len(examples.setdefault(skip, [])) < EXAMPLES_PER_REASON:
                    examples[skip].append(doc.path)
                continue
            seen.add(doc.key)
            sha = hashlib.sha256(doc.text.encode("utf-8")).hexdigest()
            if known.get(doc.key) == sha:
                counts["unchanged"] += 1
                continue
            counts["updated" if doc.key in known else "added"] += 1
            bytes_read += len(doc.text.encode("utf-8"))
            prepared.append(Prepared(doc, sha, _anonymized_chunks(doc, params, redactions)))
        removed = sorted(set(known) - seen)

        _embed_all(prepared, batch_chunks, progress)
        _encode_semantic(prepared, progress)
        built_at = datetime.now(UTC).isoformat(timespec="seconds")
        new_meta = {
            "chunker_version": str(CHUNKER_VERSION),
            "embedding_model": model,
            "embedding_dim": str(embed.DIM),
            "semantic_model": semantic.MODEL_NAME,
        }
        if ranking is not None:
            new_meta["ranking"] = json.dumps(ranking.to_json(), sort_keys=True)
        if prepared or removed or stale or new_meta.get("ranking", meta.get("ranking")) != meta.get("ranking"):
            _write(conn, prepared, removed, new_meta | {"built_at": built_at})
        n_documents, n_chunks = conn.execute("SELECT COUNT(*), COALESCE(SUM(n_chunks), 0) FROM documents").fetchone()
    finally:
        conn.close()
    return {
        "index": str(index_path(Path(out))),
        "documents": n_documents,
        "chunks": n_chunks,
        "added": counts["added"],
        "updated": counts["updated"],
        "removed": len(removed),
        "unchanged": counts["unchanged"],
        "chunks_embedded": sum(len(p.chunks) for p in prepared),
        "bytes_read": bytes_read,
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": examples,
        "redactions": dict(sorted(redactions.items())),
        "seconds": round(time.perf_counter() - started, 3),
    }


def record_grounding(out: Path, gain: dict) -> None:
    """Store in the index the context-gain figures (evaluate.context_gain) measured on it, so that
    whoever opens it can tell whether grounding helped (KnowledgeBase.grounding_warning)."""
    keys = ("bits_per_byte_without", "bits_per_byte_with_context", "documents", "window")
    conn, _ = open_for_writing(Path(out))
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('grounding', ?)", (json.dumps({k: gain[k] for k in keys}),))
        conn.execute("COMMIT")
    finally:
        conn.close()

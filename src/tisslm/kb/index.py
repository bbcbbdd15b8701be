"""Search a knowledge base: BM25 over FTS5, cosine similarity over the dense vectors, or both fused.

Lexical search finds exact identifiers and rare words; dense search finds paraphrases that share
no word with the chunk. Reciprocal rank fusion (Cormack et al., 2009) combines the two rankings
without calibrating their scores against each other: score(d) = sum over rankings of 1 / (60 + rank).

Both sides are kept cheap at 1e5 chunks: BM25 leaves out query words so common that scoring the
chunks holding them costs more than they tell (MAX_POSTINGS), and dense search ranks all vectors
by their sign bits before scoring the best few thousand exactly (RERANK_MIN, RERANK_FRACTION).

Every search runs inside one read transaction, so its FTS matches, vectors and chunk texts come
from the same snapshot even while a build commits; the vector matrix is reloaded only when the
index's generation counter says a build has committed since it was loaded.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tisslm.core.errors import TissLMError
from tisslm.kb import embed
from tisslm.kb.store import COLUMN_WEIGHTS, TOKENIZE, index_path, open_for_reading, split_identifier

MODES = ("fused", "bm25", "dense")
RRF_K = 60
FUSION_DEPTH = 100  # candidates taken from each ranking before fusing
MAX_K = 1000
# A query is a question or a prompt, not a document: beyond this it is cut (its head is kept),
# and at most MAX_TERMS distinct words go to BM25, which keeps a pasted file from costing seconds.
MAX_QUERY_CHARS = 8192
MAX_TERMS = 64
# FTS5 scores every chunk that holds any query word (about 1.5 us each), so a word found in most
# chunks ("return", "self") costs milliseconds per 10k chunks while its IDF adds almost nothing
# to the ranking. The rarest words are kept until the chunks they match would pass this many;
# the rarest word is always kept. (Lucene's MaxScore makes the same bet, more precisely.)
MAX_POSTINGS = 10_000
# Dense search above this many chunks first ranks all of them by the Hamming distance between
# sign bits (32 bytes a vector, a few ms at 100k), then scores only the best N / RERANK_FRACTION
# (at least RERANK_MIN) exactly: an exact float scan of 100k x 256 costs ~20 ms of memory traffic.
RERANK_MIN = 4096
RERANK_FRACTION = 16
STOPWORDS = frozenset(
    re.findall(
        r"\w+",
        "a an and are as at be by can do does for from has have how i if in into is it its me "
        "my of on or so that the their then there these this to was what when where which who why will with you your",
    )
)


@dataclass(frozen=True)
class Hit:
    """A retrieved chunk: lines start_line..end_line (1-based, inclusive) of `path`, and its score
    (higher is better in every mode: RRF for fused, -bm25() for bm25, cosine for dense)."""

    path: str
    name: str
    start_line: int
    end_line: int
    score: float
    text: str

    def to_json(self) -> dict:
        return asdict(self)


def query_words(query: str) -> list[str]:
    """The query's words for BM25: lowercased, without stopwords, compound identifiers also split
    into their words, at most MAX_TERMS."""
    words: list[str] = []
    for word in re.findall(r"\w+", query):
        for term in [word.lower(), *split_identifier(word)]:  # split before lowercasing: JSONDecoder
            if term not in STOPWORDS and term not in words:
                words.append(term)
    return words[:MAX_TERMS]


def match_expression(words: list[str]) -> str | None:
    """An FTS5 MATCH expression: the words OR-ed, each quoted (no operator injection); None if none."""
    return " OR ".join(f'"{w}"' for w in words) or None


def fts_query(query: str) -> str | None:
    """The MATCH expression of all the query's words (no pruning): for small tables, like the
    whole-file baseline of the evaluation."""
    return match_expression(query_words(query))


def rrf(rankings: list[list[int]], k: int = RRF_K) -> dict[int, float]:
    """Reciprocal rank fusion of rankings of ids (best first): id -> fused score."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, chunk_id in enumerate(ranking, start=1):
            scores[chunk_id] = scores.get(chunk_id, 0.0) + 1.0 / (k + rank)
    return scores


class KnowledgeBase:
    """A read-only handle on an index directory; safe to share between threads."""

    def __init__(self, directory: Path, conn: sqlite3.Connection, meta: dict[str, str]):
        self.directory = Path(directory)
        self._conn = conn
        self._meta = meta
        self._lock = threading.Lock()
        self._generation: str | None = None
        self._ids = np.zeros(0, dtype=np.int64)
        self._vectors = np.zeros((0, embed.DIM), dtype=np.float32)
        self._bits = np.zeros((embed.DIM // 64, 0), dtype=np.uint64)
        # The query's words go through the index's own tokenizer (Porter stems included), so that
        # their chunk counts can be looked up in term_df; temp tables live in this connection only.
        conn.execute(f'CREATE VIRTUAL TABLE temp.query_words USING fts5(word, tokenize="{TOKENIZE}")')
        conn.execute("CREATE VIRTUAL TABLE temp.query_terms USING fts5vocab(temp, query_words, 'instance')")

    @classmethod
    def open(cls, directory: Path) -> KnowledgeBase:
        """Open the index in `directory` for searching; a one-line TissLMError if it is missing,
        corrupt or not a TissLM knowledge base."""
        conn, meta = open_for_reading(Path(directory))
        if meta.get("embedding_model") not in (None, embed.model_name()):
            conn.close()
            raise TissLMError(
                f"{index_path(directory)}: built with {meta['embedding_model']}, this TissLM embeds with "
                f"{embed.model_name()}: rebuild it"
            )
        return cls(Path(directory), conn, meta)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> KnowledgeBase:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self, work):
        """Run `work()` in one read transaction: one consistent snapshot of the index."""
        path = index_path(self.directory)
        with self._lock:
            try:
                self._conn.execute("BEGIN")
                try:
                    return work()
                finally:
                    self._conn.execute("COMMIT")
            except sqlite3.DatabaseError as err:
                raise TissLMError(f"{path}: cannot read the knowledge base ({err})") from None

    def _load_vectors(self) -> None:
        generation = self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]
        if generation == self._generation:
            return
        rows = self._conn.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
        self._ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        blob = b"".join(r[1] for r in rows)
        self._vectors = np.frombuffer(blob, dtype=np.float16).reshape(len(rows), embed.DIM).astype(np.float32)
        # Sign bits, one row per 64 dimensions: each XOR + popcount below runs over contiguous memory.
        self._bits = np.ascontiguousarray(np.packbits(self._vectors > 0, axis=1).view(np.uint64).T)
        self._generation = generation

    def _rare_words(self, words: list[str]) -> list[str]:
        """The words worth scoring: rarest first, until their chunks would pass MAX_POSTINGS."""
        if not words:
            return []
        self._conn.execute("DELETE FROM temp.query_words")
        self._conn.executemany("INSERT INTO temp.query_words(rowid, word) VALUES (?, ?)", list(enumerate(words)))
        stems = self._conn.execute("SELECT doc, term FROM temp.query_terms").fetchall()  # doc: the word's rowid
        terms = sorted({term for _, term in stems})
        df_of = dict(
            self._conn.execute(f"SELECT term, df FROM term_df WHERE term IN ({','.join('?' * len(terms))})", terms)
        )
        df = [0] * len(words)
        for i, term in stems:
            df[i] = max(df[i], df_of.get(term, 0))
        kept, postings = [], 0
        for i in sorted(range(len(words)), key=lambda i: df[i]):
            if kept and postings + df[i] > MAX_POSTINGS:
                break
            kept.append(words[i])
            postings += df[i]
        return kept

    def _bm25(self, query: str, depth: int) -> list[tuple[int, float]]:
        match = match_expression(self._rare_words(query_words(query)))
        if match is None:
            return []
        rows = self._conn.execute(
            "SELECT rowid, bm25(chunks_fts, ?, ?, ?) AS s FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY s LIMIT ?",
            (*COLUMN_WEIGHTS, match, depth),
        ).fetchall()
        return [(chunk_id, -score) for chunk_id, score in rows]  # bm25() is negative: lower is better

    def _dense(self, query_vector: np.ndarray, depth: int) -> list[tuple[int, float]]:
        self._load_vectors()
        n = len(self._ids)
        if not n:
            return []
        n_candidates = max(RERANK_MIN, n // RERANK_FRACTION)
        if n_candidates < n:
            query_bits = np.packbits(query_vector > 0).view(np.uint64)
            hamming = np.zeros(n, dtype=np.uint16)
            for bits, q in zip(self._bits, query_bits, strict=True):
                hamming += np.bitwise_count(bits ^ q)
            candidates = np.argpartition(hamming, n_candidates - 1)[:n_candidates]
        else:
            candidates = np.arange(n)
        # einsum, not BLAS: OpenBLAS's threaded gemv costs ~6 ms of thread wake-ups here for 1 us of work.
        scores = np.einsum("ij,j->i", self._vectors[candidates], query_vector)  # (candidates,) cosine
        depth = min(depth, len(scores))
        top = np.argpartition(-scores, depth - 1)[:depth]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(self._ids[candidates[i]]), float(scores[i])) for i in top]

    def _hits(self, ranked: list[tuple[int, float]]) -> list[Hit]:
        if not ranked:
            return []
        placeholders = ",".join("?" * len(ranked))
        rows = self._conn.execute(
            f"SELECT id, path, name, start_line, end_line, text FROM chunks WHERE id IN ({placeholders})",
            [i for i, _ in ranked],
        ).fetchall()
        by_id = {r[0]: r[1:] for r in rows}
        return [Hit(*by_id[i][:4], score, by_id[i][4]) for i, score in ranked if i in by_id]

    def search(self, query: str, k: int = 10, mode: str = "fused") -> list[Hit]:
        """The `k` best chunks for `query`, best first. Mode "bm25" (lexical), "dense" (embeddings)
        or "fused" (both, by reciprocal rank fusion). A query longer than MAX_QUERY_CHARS is cut to
        its first MAX_QUERY_CHARS characters; an empty one is an error."""
        if not isinstance(query, str) or not query.strip():
            raise TissLMError("kb search: the query is empty")
        if mode not in MODES:
            raise TissLMError(f"kb search: mode={mode!r}: expected one of {', '.join(MODES)}")
        if not 1 <= k <= MAX_K:
            raise TissLMError(f"kb search: k={k}: expected 1..{MAX_K}")
        query = query[:MAX_QUERY_CHARS]
        query_vector = embed.embed([query])[0] if mode != "bm25" else None
        depth = max(k, FUSION_DEPTH) if mode == "fused" else k

        def work() -> list[Hit]:
            if mode == "bm25":
                return self._hits(self._bm25(query, k))
            if mode == "dense":
                return self._hits(self._dense(query_vector, k))
            lexical, dense = self._bm25(query, depth), self._dense(query_vector, depth)
            fused = rrf([[i for i, _ in lexical], [i for i, _ in dense]])
            best = sorted(fused.items(), key=lambda item: -item[1])[:k]
            return self._hits(best)

        return self._read(work)

    def stats(self) -> dict:
        """Documents, chunks, bytes of source text, when it was built and with which embedding model."""

        def work() -> dict:
            documents, chunks, n_bytes = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(n_chunks), 0), COALESCE(SUM(n_bytes), 0) FROM documents"
            ).fetchone()
            meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
            return {
                "directory": str(self.directory),
                "documents": documents,
                "chunks": chunks,
                "bytes": n_bytes,
                "built_at": meta.get("built_at"),
                "embedding_model": meta.get("embedding_model"),
                "embedding_dim": int(meta.get("embedding_dim", embed.DIM)),
                "index_bytes": index_path(self.directory).stat().st_size,
                "format_version": int(meta["format_version"]),
            }

        return self._read(work)

    def document_paths(self) -> set[str]:
        """The paths of the indexed documents (to tell which evaluation queries the index can answer)."""
        return self._read(lambda: {p for (p,) in self._conn.execute("SELECT path FROM documents")})

    def documents(self) -> list[tuple[str, str]]:
        """(path, text) of every indexed document as stored: its chunks joined in line order. What
        a whole-file retrieval baseline indexes, secrets already removed."""

        def work() -> list[tuple[str, str]]:
            rows = self._conn.execute("SELECT document, path, text FROM chunks ORDER BY document, start_line, id")
            joined: dict[str, tuple[str, list[str]]] = {}
            for key, path, text in rows:
                joined.setdefault(key, (path, []))[1].append(text)
            return [(path, "\n".join(texts)) for path, texts in joined.values()]

        return self._read(work)

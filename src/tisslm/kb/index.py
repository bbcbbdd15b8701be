"""Search a knowledge base: BM25 over FTS5, cosine similarity over the dense vectors, or both fused.

Lexical search finds exact identifiers and rare words; dense search finds paraphrases that share
no word with the chunk. Reciprocal rank fusion (Cormack et al., 2009) combines the two rankings
without calibrating their scores against each other: score(d) = sum over rankings of w / (60 + rank),
the dense ranking weighted down (Ranking.dense_weight), as WordLlama ranks code far worse than BM25.
The fused candidates' files are then reranked (Ranking.rerank_weights): a linear score of each file's
best lexical and dense scores and of how close all-MiniLM-L6-v2 (semantic.py) puts the query to the
file's card and documented definitions, which bridges the words a question uses and the code's.

The lexical side is code-aware (Ranking): query identifiers split into their words, BM25 weighted
per field (name, signature, docstring, text, identifier words), test files and deprecated modules
down-weighted, and each chunk lifted by its file's score. Each choice is measured on its own in
benchmarks/bench_kb.py; the index stores the ranking it was built with.

Both sides are kept cheap at 1e5 chunks: BM25 leaves out query words so common that scoring the
chunks holding them costs more than they tell (MAX_POSTINGS), and dense search ranks all vectors
by their sign bits before scoring the best few thousand exactly (RERANK_MIN, RERANK_FRACTION).

Every search runs inside one read transaction, so its FTS matches, vectors and chunk texts come
from the same snapshot even while a build commits; the vector matrix is reloaded only when the
index's generation counter says a build has committed since it was loaded.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from tisslm.core.choices import SEARCH_MODES
from tisslm.core.errors import TissLMError
from tisslm.kb import embed, semantic
from tisslm.kb.store import (
    FIELDS,
    TOKENIZE,
    covered_paths,
    index_path,
    is_test_path,
    open_for_reading,
    split_identifier,
)

DEFAULT_MODE = "fused"
RRF_K = 60
# What the file reranker weighs (Ranking.rerank_weights), for each file among the fused candidates:
# its best chunk's lexical score over the query's best; its best chunk's WordLlama cosine; the MiniLM
# cosine of its card (path and module docstring); the best MiniLM cosine of its documented definitions.
RERANK_FEATURES = ("lexical", "dense", "card", "definition")
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
class Ranking:
    """How the lexical side ranks chunks (the defaults were chosen on queries.jsonl only; every
    choice is measured on its own in benchmarks/bench_kb.py and docs/knowledge_base.md):

    - split_identifiers: a query word that is a compound identifier also searches its words
      (`JSONDecoder` -> json decoder), and the `terms` field (the text's identifiers' words) counts;
      off, the query's words are taken as typed and `terms` is weighted 0.
    - field_weights: bm25() weight of each FTS field, in FIELDS order (name, signature, doc, text,
      terms): a word in a chunk's name, signature or docstring says more than one in its body.
    - file_weight: file-level aggregation. A chunk's score becomes its own BM25 plus file_weight times
      its file's score, the sum of the file's best FILE_TOP chunk scores among the candidates, each
      halved after the first (so a file many chunks of which match lifts all of them); 0 turns it off.
    - test_weight: chunks of test files (`store.is_test_path`) have their score multiplied by it:
      1 ranks them as any code, 0 leaves them out (they stay indexed, and a weight above 0 finds them).
    - test_evidence: a test chunk's score (before test_weight) also lifts the file it tests
      (`store.covered_paths`: `test/test_shutil.py` -> `shutil.py`), times this, summed as the file
      score is. Tests call the code in the words users ask with ("executable", "timeout") where the
      code's own names and docstrings may not; 0 turns it off.
    - deprecated_weight: the same for chunks of deprecated modules (a module that warns at import
      that it is deprecated, or any module of a package whose `__init__` does: distutils, lib2to3,
      asyncore, ...): the maintained module that does the same job is the better answer.
    - dense_weight: in fused mode, the weight of the dense ranking's reciprocal ranks against the
      lexical ranking's (weight 1).
    - rerank_weights: in fused mode, the files of the fused candidates are reordered by a linear
      score of their RERANK_FEATURES, with these weights (fit by logistic regression on
      queries.jsonl: tools/fit_kb_rerank.py); each chunk's score becomes its file's. All 0 keeps
      the fused order (and scores).
    """

    split_identifiers: bool = True
    field_weights: tuple[float, ...] = (4.0, 2.0, 2.0, 1.0, 0.25)
    file_weight: float = 0.3
    test_weight: float = 0.3
    test_evidence: float = 0.15
    deprecated_weight: float = 0.5
    dense_weight: float = 0.25
    depth: int = 500  # lexical candidates scored and aggregated per query
    rerank_weights: tuple[float, ...] = (1.0, 0.173, 0.463, 1.021)

    def __post_init__(self) -> None:
        if len(self.field_weights) != len(FIELDS) or any(w < 0 for w in self.field_weights):
            raise TissLMError(f"kb ranking: field_weights needs {len(FIELDS)} weights >= 0 ({', '.join(FIELDS)})")
        if not (0 <= self.test_weight <= 1 and 0 <= self.deprecated_weight <= 1):
            raise TissLMError("kb ranking: test_weight and deprecated_weight must be in [0, 1]")
        if len(self.rerank_weights) != len(RERANK_FEATURES):
            raise TissLMError(
                f"kb ranking: rerank_weights needs {len(RERANK_FEATURES)} weights ({', '.join(RERANK_FEATURES)})"
            )
        if min(self.file_weight, self.dense_weight, self.test_evidence) < 0:
            raise TissLMError("kb ranking: file_weight, dense_weight and test_evidence must be >= 0")

    def to_json(self) -> dict:
        return {
            **asdict(self),
            "field_weights": dict(zip(FIELDS, self.field_weights, strict=True)),
            "rerank_weights": dict(zip(RERANK_FEATURES, self.rerank_weights, strict=True)),
        }

    @classmethod
    def from_json(cls, data: dict) -> Ranking:
        """The inverse of to_json; field_weights and rerank_weights as {name: weight} (missing names
        keep their default)."""
        data = dict(data)
        for key, names in (("field_weights", FIELDS), ("rerank_weights", RERANK_FEATURES)):
            if isinstance(data.get(key), dict):
                given = data[key]
                unknown = set(given) - set(names)
                if unknown:
                    raise TissLMError(
                        f"kb ranking: unknown {key} name(s) {', '.join(sorted(unknown))}; names: {', '.join(names)}"
                    )
                defaults = dict(zip(names, cls.__dataclass_fields__[key].default, strict=True))
                data[key] = tuple(float(given.get(n, defaults[n])) for n in names)
            elif key in data:
                data[key] = tuple(data[key])
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise TissLMError(f"kb ranking: unknown setting(s) {', '.join(sorted(unknown))}")
        return cls(**data)


DEFAULT_RANKING = Ranking()
FILE_TOP = 3  # chunks of a file that make its score


@dataclass(frozen=True)
class Hit:
    """A retrieved chunk: lines start_line..end_line (1-based, inclusive) of `path`, and its score
    (higher is better in every mode: fused, its file's rerank score, or RRF when rerank_weights are
    all 0; -bm25() for bm25; cosine for dense)."""

    path: str
    name: str
    start_line: int
    end_line: int
    score: float
    text: str

    def to_json(self) -> dict:
        return asdict(self)


def query_words(query: str, split: bool = True) -> list[str]:
    """The query's words for BM25: lowercased, without stopwords, compound identifiers also split
    into their words (unless `split` is false), at most MAX_TERMS."""
    words: list[str] = []
    for word in re.findall(r"\w+", query):
        parts = split_identifier(word) if split else []
        for term in [word.lower(), *parts]:  # split before lowercasing: JSONDecoder
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


def rrf(rankings: list[list[int]], k: int = RRF_K, weights: list[float] | None = None) -> dict[int, float]:
    """Reciprocal rank fusion of rankings of ids (best first), each weighted (default 1): id -> fused score."""
    scores: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights or [1.0] * len(rankings), strict=True):
        for rank, chunk_id in enumerate(ranking, start=1):
            scores[chunk_id] = scores.get(chunk_id, 0.0) + weight / (k + rank)
    return scores


def _file_score(scores: list[float]) -> float:
    """A file's score from its chunks' scores: the best FILE_TOP, each halved after the first."""
    return sum(s * 0.5**i for i, s in enumerate(sorted(scores, reverse=True)[:FILE_TOP]))


def rank_chunks(
    rows: list[tuple[int, float, str, int]],
    ranking: Ranking = DEFAULT_RANKING,
    deprecated: frozenset[str] | set[str] = frozenset(),
    covered: Mapping[str, str] = MappingProxyType({}),
) -> list[tuple[int, float]]:
    """(chunk id, BM25 score, document, is_test) candidates -> (chunk id, score), best first: test
    chunks' scores times `test_weight` and those of `deprecated` documents times `deprecated_weight`
    (left out at 0), then each chunk lifted by `file_weight` times its file's score and by
    `test_evidence` times the score of the test chunks of the file (`covered`: test document -> the
    document it tests), both summed over the best FILE_TOP chunks, each halved after the first."""
    scored = []
    evidence: dict[str, list[float]] = defaultdict(list)
    for chunk_id, score, document, is_test in rows:
        if document in covered:
            evidence[covered[document]].append(score)
        weight = (ranking.test_weight if is_test else 1.0) * (
            ranking.deprecated_weight if document in deprecated else 1.0
        )
        if weight > 0:
            scored.append((chunk_id, score * weight, document))
    per_file: dict[str, list[float]] = defaultdict(list)
    for _, score, document in scored:
        per_file[document].append(score)
    lift = {
        document: ranking.file_weight * _file_score(scores) + ranking.test_evidence * _file_score(evidence[document])
        for document, scores in per_file.items()
    }
    final = [(chunk_id, score + lift[document]) for chunk_id, score, document in scored]
    return sorted(final, key=lambda item: -item[1])


def covered_documents(keys: Mapping[str, str]) -> dict[str, str]:
    """Test document key -> the key of the library document it tests, for the tests whose target
    (`store.covered_paths`) is indexed: that path, else the one library path ending in it
    (`tests/test_io.py` -> `src/pkg/io.py`). `keys` maps every indexed path to its document key."""
    by_suffix: dict[str, list[str]] = defaultdict(list)  # every tail of every library path -> those paths
    for path in keys:
        if not is_test_path(path):
            parts = path.split("/")
            for start in range(len(parts)):
                by_suffix["/".join(parts[start:])].append(path)
    covered = {}
    for path, key in keys.items():
        for candidate in covered_paths(path):
            matches = [candidate] if candidate in keys else by_suffix.get(candidate, [])
            if len(matches) == 1:
                covered[key] = keys[matches[0]]
                break
    return covered


class KnowledgeBase:
    """A read-only handle on an index directory; safe to share between threads."""

    def __init__(self, directory: Path, conn: sqlite3.Connection, meta: dict[str, str]):
        self.directory = Path(directory)
        self._conn = conn
        self._meta = meta
        # The ranking the index was built with (build_index(ranking=...), the stage's params), else the default.
        self.ranking = Ranking.from_json(json.loads(meta["ranking"])) if meta.get("ranking") else DEFAULT_RANKING
        self._lock = threading.Lock()
        self._generation: str | None = None
        self._ids = np.zeros(0, dtype=np.int64)
        self._vectors = np.zeros((0, embed.DIM), dtype=np.float32)
        self._bits = np.zeros((embed.DIM // 64, 0), dtype=np.uint64)
        self._flagged: list[tuple[int, bool, bool]] = []
        self._deprecated: frozenset[str] = frozenset()
        self._covered: dict[str, str] = {}
        self._documents_generation: str | None = None
        self._tests_generation: str | None = None
        # The query's words go through the index's own tokenizer (Porter stems included), so that
        # their chunk counts can be looked up in term_df; temp tables live in this connection only.
        conn.execute(f'CREATE VIRTUAL TABLE temp.query_words USING fts5(word, tokenize="{TOKENIZE}")')
        conn.execute("CREATE VIRTUAL TABLE temp.query_terms USING fts5vocab(temp, query_words, 'instance')")

    def grounding(self) -> dict | None:
        """The context-gain figures the pipeline measured on this index (build.record_grounding):
        val bits/byte without and with retrieved context; None if never measured."""
        return json.loads(self._meta["grounding"]) if self._meta.get("grounding") else None

    def grounding_warning(self) -> str | None:
        """A one-line warning when retrieved context made the model worse on held-out text, else None."""
        g = self.grounding()
        if not g or not g["bits_per_byte_with_context"] > g["bits_per_byte_without"]:
            return None
        return (
            f"grounding with this knowledge base made the model worse on held-out text: val bits/byte "
            f"{g['bits_per_byte_with_context']:.4f} with retrieved context vs {g['bits_per_byte_without']:.4f} "
            f"without ({g['documents']} documents, metrics/kb.json context_gain)"
        )

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
        if meta.get("semantic_model") not in (None, semantic.MODEL_NAME):
            conn.close()
            raise TissLMError(
                f"{index_path(directory)}: its reranking vectors are {meta['semantic_model']}'s, this TissLM "
                f"reranks with {semantic.MODEL_NAME}: rebuild it"
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

    def _bm25(self, query: str, depth: int, ranking: Ranking = DEFAULT_RANKING) -> list[tuple[int, float]]:
        """The lexical ranking: field-weighted BM25 over the best `ranking.depth` chunks, tests
        down-weighted, each chunk lifted by its file's score; the best `depth`."""
        match = match_expression(self._rare_words(query_words(query, ranking.split_identifiers)))
        if match is None:
            return []
        weights = list(ranking.field_weights)
        if not ranking.split_identifiers:
            weights[FIELDS.index("terms")] = 0.0
        placeholders = ", ".join("?" * len(weights))
        rows = self._conn.execute(
            f"SELECT f.rowid, -bm25(chunks_fts, {placeholders}) AS s, c.document, c.is_test"
            " FROM chunks_fts AS f JOIN chunks AS c ON c.id = f.rowid"
            " WHERE chunks_fts MATCH ? ORDER BY s DESC LIMIT ?",
            (*weights, match, max(depth, ranking.depth)),
        ).fetchall()  # bm25() is negative: lower is better, so it is negated
        self._read_documents()
        return rank_chunks(rows, ranking, self._deprecated, self._covered)[:depth]

    def _read_documents(self) -> None:
        """Refresh, once per build, the keys of the deprecated documents (flagged at build, or under a
        flagged package's __init__) and which library document each test document tests."""
        generation = self._conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]
        if self._documents_generation == generation:
            return
        rows = self._conn.execute("SELECT key, path, deprecated FROM documents").fetchall()
        packages = tuple(path[: -len("__init__.py")] for _, path, flag in rows if flag and path.endswith("__init__.py"))
        self._deprecated = frozenset(
            key for key, path, flag in rows if flag or (packages and path.startswith(packages))
        )
        self._covered = covered_documents({path: key for key, path, _ in rows})
        self._documents_generation = generation

    def _dense(
        self, query_vector: np.ndarray, depth: int, ranking: Ranking = DEFAULT_RANKING
    ) -> list[tuple[int, float]]:
        """Cosine ranking; test chunks left out when test_weight is 0, else their score times it."""
        plain = ranking.test_weight == 1 and ranking.deprecated_weight == 1
        ranked = self._dense_all(query_vector, depth if plain else 4 * depth)
        if plain:
            return ranked
        weights = self._chunk_weights(ranking)
        weighted = [(i, s * weights.get(i, 1.0)) for i, s in ranked]
        return sorted([(i, s) for i, s in weighted if weights.get(i, 1.0) > 0], key=lambda item: -item[1])[:depth]

    def _chunk_weights(self, ranking: Ranking) -> dict[int, float]:
        """Chunk id -> its test/deprecated weight, for the chunks whose weight is not 1."""
        if self._tests_generation != self._generation:
            self._read_documents()
            deprecated = self._deprecated
            self._flagged = [
                (i, bool(is_test), document in deprecated)
                for i, is_test, document in self._conn.execute("SELECT id, is_test, document FROM chunks")
                if is_test or document in deprecated
            ]
            self._tests_generation = self._generation
        return {
            i: (ranking.test_weight if is_test else 1.0) * (ranking.deprecated_weight if old else 1.0)
            for i, is_test, old in self._flagged
        }

    def _dense_all(self, query_vector: np.ndarray, depth: int) -> list[tuple[int, float]]:
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

    def _fused(
        self, query: str, query_vector: np.ndarray, depth: int, ranking: Ranking
    ) -> tuple[list[tuple[int, float]], list[tuple[int, float]], list[tuple[int, float]]]:
        """The fused ranking of the best `depth` of each side (best first), and the two sides."""
        lexical, dense = self._bm25(query, depth, ranking), self._dense(query_vector, depth, ranking)
        fused = rrf([[i for i, _ in lexical], [i for i, _ in dense]], weights=[1.0, ranking.dense_weight])
        return sorted(fused.items(), key=lambda item: -item[1]), lexical, dense

    def _file_features(
        self,
        query_vector: np.ndarray,
        ranked: list[tuple[int, float]],
        lexical: list[tuple[int, float]],
        dense: list[tuple[int, float]],
    ) -> tuple[dict[int, str], list[str], np.ndarray]:
        """For the files of the `ranked` chunks: chunk id -> document, the documents in rank order, and
        their RERANK_FEATURES, shape (documents, 4). `query_vector` is the query's MiniLM vector."""
        ids = [i for i, _ in ranked]
        placeholders = ",".join("?" * len(ids))
        document_of = dict(self._conn.execute(f"SELECT id, document FROM chunks WHERE id IN ({placeholders})", ids))
        documents = list(dict.fromkeys(document_of[i] for i in ids))
        position = {d: n for n, d in enumerate(documents)}
        features = np.zeros((len(documents), len(RERANK_FEATURES)), dtype=np.float32)
        top = max((s for _, s in lexical), default=0.0)
        for column, scores, scale in ((0, lexical, top if top > 0 else 1.0), (1, dense, 1.0)):
            for i, score in scores:
                row = position[document_of[i]]
                features[row, column] = max(features[row, column], score / scale)
        placeholders = ",".join("?" * len(documents))
        rows = self._conn.execute(
            f"SELECT document, vectors FROM semantic WHERE document IN ({placeholders})", documents
        ).fetchall()
        if rows:
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float16).reshape(-1, semantic.DIM)
            cosines = np.einsum("ij,j->i", vectors.astype(np.float32), query_vector)  # (vectors,)
            start = 0
            for document, blob in rows:  # the card's cosine, then the best documented definition's
                end = start + len(blob) // (2 * semantic.DIM)
                row = position[document]
                features[row, 2] = max(cosines[start], 0.0)
                features[row, 3] = max(cosines[start + 1 : end].max(initial=0.0), 0.0)
                start = end
        return document_of, documents, features

    def _rerank(
        self,
        query_vector: np.ndarray,
        ranked: list[tuple[int, float]],
        lexical: list[tuple[int, float]],
        dense: list[tuple[int, float]],
        ranking: Ranking,
    ) -> list[tuple[int, float]]:
        """The fused chunks reordered by their files' rerank scores (ties keep the fused order), each
        chunk scored as its file."""
        document_of, documents, features = self._file_features(query_vector, ranked, lexical, dense)
        file_score = dict(zip(documents, (features @ np.asarray(ranking.rerank_weights)).tolist(), strict=True))
        rescored = [(i, file_score[document_of[i]]) for i, _ in ranked]
        return sorted(rescored, key=lambda item: -item[1])  # stable: the fused order within a file

    def rerank_features(self, query: str, ranking: Ranking | None = None) -> list[tuple[str, list[float]]]:
        """(path, RERANK_FEATURES) of each file among the fused candidates for `query`, in fused order:
        what tools/fit_kb_rerank.py fits the rerank weights on."""
        ranking = ranking or self.ranking
        query_vector = embed.embed([query])[0]

        def work() -> list[tuple[str, list[float]]]:
            ranked, lexical, dense = self._fused(query, query_vector, FUSION_DEPTH, ranking)
            if not ranked:
                return []
            _, documents, features = self._file_features(semantic.encode([query])[0], ranked, lexical, dense)
            paths = dict(self._conn.execute("SELECT key, path FROM documents"))
            return [(paths[d], row) for d, row in zip(documents, features.tolist(), strict=True)]

        return self._read(work)

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

    def search(self, query: str, k: int = 10, mode: str = DEFAULT_MODE, ranking: Ranking | None = None) -> list[Hit]:
        """The `k` best chunks for `query`, best first. Mode "bm25" (lexical: code-aware BM25, see
        Ranking), "dense" (embeddings) or "fused" (both, by reciprocal rank fusion); `ranking` (default
        the index's own, else DEFAULT_RANKING) sets the ranking's knobs. A query longer than MAX_QUERY_CHARS is cut to
        its first MAX_QUERY_CHARS characters; an empty one is an error."""
        ranking = ranking or self.ranking
        if not isinstance(query, str) or not query.strip():
            raise TissLMError("kb search: the query is empty")
        if mode not in SEARCH_MODES:
            raise TissLMError(f"kb search: mode={mode!r}: expected one of {', '.join(SEARCH_MODES)}")
        if not 1 <= k <= MAX_K:
            raise TissLMError(f"kb search: k={k}: expected 1..{MAX_K}")
        query = query[:MAX_QUERY_CHARS]
        query_vector = embed.embed([query])[0] if mode != "bm25" else None
        depth = max(k, FUSION_DEPTH) if mode == "fused" else k

        def work() -> list[Hit]:
            if mode == "bm25":
                return self._hits(self._bm25(query, k, ranking))
            if mode == "dense":
                return self._hits(self._dense(query_vector, k, ranking))
            ranked, lexical, dense = self._fused(query, query_vector, depth, ranking)
            if ranked and any(ranking.rerank_weights):
                ranked = self._rerank(semantic.encode([query])[0], ranked, lexical, dense, ranking)
            return self._hits(ranked[:k])

        return self._read(work)

    def stats(self) -> dict:
        """Documents, chunks, bytes of source text, when it was built and with which embedding models
        (WordLlama for every chunk; MiniLM for the reranker's cards and definitions, counted)."""

        def work() -> dict:
            documents, chunks, n_bytes = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(n_chunks), 0), COALESCE(SUM(n_bytes), 0) FROM documents"
            ).fetchone()
            meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
            cards, vectors = self._conn.execute(
                f"SELECT COUNT(*), COALESCE(SUM(LENGTH(vectors)), 0) / {2 * semantic.DIM} FROM semantic"
            ).fetchone()
            return {
                "directory": str(self.directory),
                "documents": documents,
                "chunks": chunks,
                "bytes": n_bytes,
                "built_at": meta.get("built_at"),
                "embedding_model": meta.get("embedding_model"),
                "embedding_dim": int(meta.get("embedding_dim", embed.DIM)),
                "semantic_model": meta.get("semantic_model"),
                "semantic_cards": cards,
                "semantic_definitions": vectors - cards,
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

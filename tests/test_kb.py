"""The knowledge base on real SQLite files: chunk spans, incremental builds, retrieval, concurrency,
bad inputs and secrets. Corpora are generated in tmp_path."""

from __future__ import annotations

import ast
import sqlite3
import threading
from pathlib import Path

import pytest

from tisslm.core.errors import TissLMError
from tisslm.data.shards import COLUMNS, doc_id, text_sha256, write_shards
from tisslm.data.tokens import is_val
from tisslm.kb import KnowledgeBase, build_index
from tisslm.kb.chunk import chunk_document, chunk_prose, chunk_python
from tisslm.kb.store import INDEX_FILE

PYTHON_SOURCE = '''"""Geometry helpers.

Shapes and their areas.
"""

import math

UNIT = 1.0


def _registry(cls):
    return cls


@_registry
class Circle:
    """A circle."""

    sides = 0

    def __init__(self, radius):
        self.radius = radius

    @property
    def area(self):
        return math.pi * self.radius**2

    class Style:
        colour = "red"

        def describe(self):
            def inner():
                return self.colour

            return inner()


async def fetch_shape(name):
    """Look a shape up by name."""
    return name
'''

WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
]


def filler_module(i: int) -> str:
    """A plausible but unremarkable module: no word of the planted document appears in it."""
    w = [WORDS[(i + j) % len(WORDS)] for j in range(4)]
    return (
        f'"""Helpers for {w[0]} and {w[1]} records."""\n\n\n'
        f'def {w[0]}_{i}(items):\n    """Return the {w[2]} items."""\n    return [x for x in items if x]\n\n\n'
        f"def {w[3]}_total_{i}(values):\n    total = 0\n    for v in values:\n        total += v\n    return total\n"
    )


PLANTED = '''def levenshtein_distance(source, target):
    """Count the insertions, deletions and substitutions that turn one string into another."""
    previous = list(range(len(target) + 1))
    for i, a in enumerate(source, start=1):
        current = [i]
        for j, b in enumerate(target, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a != b)))
        previous = current
    return previous[-1]
'''


def write_corpus(root: Path, n: int = 30) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"mod_{i:03d}.py").write_text(filler_module(i))
    (root / "pkg").mkdir(exist_ok=True)
    (root / "pkg" / "edits.py").write_text(PLANTED)
    (root / "README.md").write_text("# Corpus\n\nA test corpus.\n\n## Usage\n\nImport the modules.\n")
    return root


@pytest.fixture(scope="module")
def corpus_kb(tmp_path_factory) -> Path:
    root = write_corpus(tmp_path_factory.mktemp("corpus"))
    out = tmp_path_factory.mktemp("kb")
    build_index(out, directory=root, progress=False)
    return out


# ---- chunking ----


def test_python_chunks_point_at_their_source_lines():
    chunks = chunk_python("geo/shapes.py", PYTHON_SOURCE)
    lines = PYTHON_SOURCE.splitlines()
    by_name = {c.name: c for c in chunks}
    assert {"geo.shapes", "geo.shapes._registry", "geo.shapes.Circle", "geo.shapes.Circle.__init__",
            "geo.shapes.Circle.area", "geo.shapes.Circle.Style", "geo.shapes.Circle.Style.describe",
            "geo.shapes.fetch_shape"} <= set(by_name)  # fmt: skip
    assert "geo.shapes.Circle.Style.describe.inner" not in by_name  # nested functions stay in their parent
    for chunk in chunks:
        assert chunk.text == "\n".join(lines[chunk.start_line - 1 : chunk.end_line])
    # Every definition's span is exactly the node's, decorators included.
    tree = ast.parse(PYTHON_SOURCE)
    circle = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    area = next(n for n in circle.body if getattr(n, "name", "") == "area")
    assert (by_name["geo.shapes.Circle.area"].start_line, by_name["geo.shapes.Circle.area"].end_line) == (
        area.decorator_list[0].lineno,
        area.end_lineno,
    )
    assert by_name["geo.shapes.Circle"].text.startswith("@_registry\nclass Circle:")
    assert '"""A circle."""' in by_name["geo.shapes.Circle"].text and "def " not in by_name["geo.shapes.Circle"].text
    docstring, imports = [c for c in chunks if c.name == "geo.shapes"][:2]  # the module's own chunks
    assert docstring.kind == "module" and (docstring.start_line, docstring.end_line) == (1, 4)
    assert imports.kind == "code" and imports.text == "import math\n\nUNIT = 1.0"
    assert by_name["geo.shapes.fetch_shape"].text.startswith("async def fetch_shape(name):")
    assert chunk_python("pkg/__init__.py", "def f():\n    pass\n")[0].name == "pkg.f"


def test_prose_chunks_follow_headings_and_ignore_hashes_in_code():
    text = "Intro line.\n\n# Install\n\nRun it.\n\n```sh\n# not a heading\n\npip install x\n```\n\n## From source\n\nClone.\n"
    chunks = chunk_prose("docs/guide.md", text)
    lines = text.splitlines()
    assert [c.name for c in chunks] == ["guide.md", "guide.md > Install", "guide.md > Install > From source"]
    install = chunks[1]
    assert "# not a heading" in install.text and "pip install x" in install.text
    for chunk in chunks:
        assert chunk.text == "\n".join(lines[chunk.start_line - 1 : chunk.end_line])
    # Python that does not parse falls back to prose chunks instead of failing.
    assert chunk_document("old.py", "print 'python 2'\n")[0].kind == "section"


# ---- building ----


def test_incremental_rebuild_touches_only_changed_files(tmp_path):
    root = write_corpus(tmp_path / "src", n=5)
    out = tmp_path / "kb"
    first = build_index(out, directory=root, progress=False)
    assert (first["added"], first["updated"], first["removed"], first["unchanged"]) == (7, 0, 0, 0)

    def chunk_rows() -> dict[str, list[tuple]]:
        with sqlite3.connect(out / INDEX_FILE) as db:
            rows = db.execute("SELECT document, id, vector FROM chunks ORDER BY id").fetchall()
        grouped: dict[str, list[tuple]] = {}
        for document, chunk_id, vector in rows:
            grouped.setdefault(document, []).append((chunk_id, vector))
        return grouped

    with KnowledgeBase.open(out) as kb:
        built_at = kb.stats()["built_at"]
    before = chunk_rows()
    again = build_index(out, directory=root, progress=False)
    assert (again["added"], again["updated"], again["removed"], again["unchanged"], again["chunks_embedded"]) == (
        0, 0, 0, 7, 0,
    )  # fmt: skip
    with KnowledgeBase.open(out) as kb:
        assert kb.stats()["built_at"] == built_at  # nothing was written

    (root / "mod_001.py").write_text(filler_module(1) + "\n\ndef zeppelin_route():\n    return 'airship'\n")
    (root / "mod_002.py").unlink()
    (root / "new.py").write_text("def quokka_habitat():\n    return 'island'\n")
    report = build_index(out, directory=root, progress=False)
    assert (report["added"], report["updated"], report["removed"], report["unchanged"]) == (1, 1, 1, 5)
    assert report["chunks_embedded"] == len(chunk_document("mod_001.py", (root / "mod_001.py").read_text())) + 1
    after = chunk_rows()
    for unchanged in ("mod_000.py", "mod_003.py", "mod_004.py", "pkg/edits.py", "README.md"):
        assert after[unchanged] == before[unchanged]  # same rows, same vectors: not re-embedded
    assert "mod_002.py" not in after
    with KnowledgeBase.open(out) as kb:
        assert kb.search("zeppelin_route", k=1, mode="bm25")[0].name == "mod_001.zeppelin_route"
        assert kb.search("quokka_habitat", k=1, mode="bm25")[0].path == "new.py"
        assert all(h.path != "mod_002.py" for h in kb.search("charlie delta echo records", k=50, mode="bm25"))
        assert kb.stats()["documents"] == 7


def test_clean_corpus_indexes_the_train_split_only(tmp_path):
    import datasets

    paths = [f"lib/m{i}.py" for i in range(40)]
    texts = [f"def function_{i}():\n    return {i}\n" for i in range(40)]
    ids = [doc_id("stdlib", p) for p in paths]
    train_only = [i % 2 == 0 for i in range(40)]  # the even ones come from a train-only source
    table = {"id": ids, "source": ["stdlib"] * 40, "path": paths, "text": texts,
             "n_bytes": [len(t) for t in texts], "sha256": [text_sha256(t) for t in texts],
             "train_only": train_only}  # fmt: skip
    write_shards(datasets.Dataset.from_dict({c: table[c] for c in COLUMNS}), tmp_path / "clean", shard_rows=16)
    report = build_index(tmp_path / "kb", clean=tmp_path / "clean", val_fraction=0.25, progress=False)
    train = {p for p, i, t in zip(paths, ids, train_only, strict=True) if not is_val(i, 0.25, t)}
    assert any(
        t and is_val(i, 0.25) for i, t in zip(ids, train_only, strict=True)
    )  # a train-only doc the hash would hold out
    assert 0 < len(train) < 40 and report["documents"] == len(train)
    with KnowledgeBase.open(tmp_path / "kb") as kb:
        assert kb.document_paths() == train


# ---- retrieval ----


@pytest.mark.parametrize("mode", ["fused", "bm25", "dense"])
def test_the_planted_document_comes_first(corpus_kb, mode):
    with KnowledgeBase.open(corpus_kb) as kb:
        hits = kb.search("edit distance between two strings: insertions, deletions, substitutions", k=5, mode=mode)
    assert hits[0].path == "pkg/edits.py" and hits[0].name == "pkg.edits.levenshtein_distance"
    assert (hits[0].start_line, hits[0].end_line) == (1, 9) and hits[0].text == PLANTED.rstrip("\n")
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert set(hits[0].to_json()) == {"path", "name", "start_line", "end_line", "score", "text"}


def test_bad_queries_get_one_line_errors_and_huge_ones_are_cut(corpus_kb):
    with KnowledgeBase.open(corpus_kb) as kb:
        for query in ("", "   \n"):
            with pytest.raises(TissLMError, match="query is empty"):
                kb.search(query)
        with pytest.raises(TissLMError, match="mode='semantic'"):
            kb.search("x", mode="semantic")
        with pytest.raises(TissLMError, match="k=0"):
            kb.search("x", k=0)
        huge = "levenshtein distance " + "lorem ipsum dolor sit amet " * 40_000  # about 1 MB
        assert len(huge) > 1_000_000
        for mode in ("fused", "dense"):
            assert len(kb.search(huge, k=3, mode=mode)) == 3
        assert kb.search(huge, k=3, mode="bm25")[0].path == "pkg/edits.py"  # the head of the query is kept
        assert kb.search("?!*", k=3, mode="bm25") == []  # no word: nothing lexical, and no FTS syntax error
        assert len(kb.search('"unbalanced AND (NEAR', k=3)) == 3  # FTS operators are quoted, not parsed


def test_corrupt_and_foreign_files_are_one_line_errors(tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / INDEX_FILE).write_bytes(b"this is not a database" * 100)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with sqlite3.connect(foreign / INDEX_FILE) as db:
        db.execute("CREATE TABLE people (name TEXT)")
    foreign_bytes = (foreign / INDEX_FILE).read_bytes()
    for directory in (corrupt, foreign, tmp_path / "missing"):
        with pytest.raises(TissLMError) as err:
            KnowledgeBase.open(directory)
        assert str(directory / INDEX_FILE) in str(err.value) and "\n" not in str(err.value)
    for directory in (corrupt, foreign):  # a build never overwrites what it does not recognise
        with pytest.raises(TissLMError, match="not a TissLM knowledge base"):
            build_index(directory, files=[tmp_path / "nothing.py"], progress=False)
    assert (foreign / INDEX_FILE).read_bytes() == foreign_bytes


def test_concurrent_readers_see_the_index_before_or_after_a_build(tmp_path):
    root = write_corpus(tmp_path / "src", n=10)
    out = tmp_path / "kb"
    build_index(out, directory=root, progress=False)

    def snapshot(kb: KnowledgeBase) -> tuple[tuple[int, int], int]:
        return (kb.stats()["documents"], kb.stats()["chunks"]), len(
            kb.search("alpha bravo records", k=1000, mode="bm25")
        )

    with KnowledgeBase.open(out) as kb:
        before = snapshot(kb)
    for i in range(10, 150):
        (root / f"mod_{i:03d}.py").write_text(filler_module(i))
    seen: set[tuple] = set()
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        try:
            with KnowledgeBase.open(out) as kb:
                while not done.is_set():
                    stats = kb.stats()
                    hits = kb.search("alpha bravo records", k=1000, mode="bm25")
                    seen.add(((stats["documents"], stats["chunks"]), len(hits)))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    report = build_index(out, directory=root, progress=False)
    with KnowledgeBase.open(out) as kb:  # one more look after the commit, in case the readers were slow
        after = snapshot(kb)
    done.set()
    for t in threads:
        t.join()
    assert not errors
    assert report["added"] == 140 and after[0][0] == before[0][0] + 140 and after[1] > before[1]
    # Each stats() and each search() saw one whole snapshot: the counts of before or of after, nothing between.
    assert {counts for counts, _ in seen} <= {before[0], after[0]}
    assert {hits for _, hits in seen} <= {before[1], after[1]}


def test_binary_files_are_skipped_and_secrets_never_indexed(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    key, email = "AKIAIOSFODNN7EXAMPLE", "alice.smith@example.com"
    (root / "settings.py").write_text(
        f'"""Deployment settings; questions to {email}."""\n\n\ndef credentials():\n'
        f'    aws_access_key_id = "{key}"\n    return aws_access_key_id\n'
    )
    (root / "logo.txt").write_bytes(b"GIF89a\x00\x01\x02binary")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    out = tmp_path / "kb"
    report = build_index(out, directory=root, progress=False)
    assert report["skipped"] == {"binary": 1, "not_utf8": 1} and report["documents"] == 1
    assert set(report["skipped_examples"]["binary"]) == {"logo.txt"}
    assert report["redactions"]["SECRET"] >= 1 and report["redactions"]["EMAIL"] == 1
    with KnowledgeBase.open(out) as kb:
        for query in (key, email, "alice smith example", "credentials aws access key"):
            for hit in kb.search(query, k=10):
                assert key not in hit.text and email not in hit.text
        assert "<SECRET>" in kb.search("credentials", k=1, mode="bm25")[0].text
    for file in out.iterdir():  # not in the database's pages either (WAL included)
        data = file.read_bytes()
        assert key.encode() not in data and email.encode() not in data


def test_common_words_are_left_out_of_bm25_but_rare_ones_kept(corpus_kb, monkeypatch):
    from tisslm.kb import index

    with KnowledgeBase.open(corpus_kb) as kb:
        # "return" is in 61 chunks of this corpus, "items" in 30; "distances" stems to the planted function's word.
        monkeypatch.setattr(index, "MAX_POSTINGS", 40)
        assert kb._read(lambda: kb._rare_words(["return", "items", "distances", "zzz"])) == [
            "zzz",
            "distances",
            "items",
        ]
        monkeypatch.setattr(index, "MAX_POSTINGS", 1)
        assert kb._read(lambda: kb._rare_words(["return", "items"])) == ["items"]  # the rarest is always kept
        hits = kb.search("return the levenshtein distances", k=3, mode="bm25")
    assert hits[0].name == "pkg.edits.levenshtein_distance"


def test_query_words_split_identifiers_and_drop_stopwords():
    from tisslm.kb.index import query_words

    assert query_words("How does JSONDecoder.raw_decode work?") == [
        "jsondecoder", "json", "decoder", "raw_decode", "raw", "decode", "work",
    ]  # fmt: skip

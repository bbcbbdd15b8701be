"""Code-aware ranking of the knowledge base, each behaviour on a tiny corpus written by the test:
identifier splitting, field weights (name, signature, docstring), file-level aggregation, test files
down-weighted or left out, tests lifting the file they test, deprecated modules down-weighted, the
ranking stored in the index, the grounding warning, and the held-out query set's labels."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from tisslm.core.config import KnowledgeBaseParams
from tisslm.core.errors import TissLMError
from tisslm.kb import KnowledgeBase, build_index
from tisslm.kb.build import record_grounding
from tisslm.kb.chunk import chunk_python
from tisslm.kb.evaluate import HELDOUT_QUERIES, load_queries
from tisslm.kb.index import DEFAULT_RANKING, Ranking, covered_documents, rank_chunks
from tisslm.kb.store import covered_paths, is_deprecated_module, is_test_path

STDLIB = Path(sysconfig.get_paths()["stdlib"])

HASHING = '''"""Hash objects for messages."""


def new(name, data=b""):
    """Return a new hashing object using the named algorithm (sha256, md5, ...)."""
    return _constructors[name](data)


def file_digest(fileobj, digest, /, *, _bufsize=2**18):
    """Hash the contents of a file-like object. Returns a digest object."""
    digestobj = new(digest) if isinstance(digest, str) else digest()
    buf = bytearray(_bufsize)
    while True:
        size = fileobj.readinto(buf)
        if size == 0:
            break
        digestobj.update(buf[:size])
    return digestobj
'''

# A file that says "file" and "digest" often, never as one identifier.
NOISE = '''def report(path):
    """Write a report of each file: its name, size and a digest line."""
    file = open(path)
    lines = [line for line in file]
    file.close()
    return "file: " + path + " digest: " + str(len(lines))
'''

CSV_LIBRARY = '''"""Read and write tabular data."""


class DictReader:
    """Read the rows of a csv file into dicts keyed by the header row."""

    def __init__(self, f, fieldnames=None):
        self.reader = iter(f)
        self.fieldnames = fieldnames

    def __next__(self):
        row = next(self.reader)
        return dict(zip(self.fieldnames, row.split(",")))
'''


def csv_test_module() -> str:
    """Five test functions that read a csv file into dicts, over and over, as test suites do."""
    tests = [
        f'def test_read_csv_file_into_dicts_{i}():\n    """Read a csv file into dicts."""\n'
        f'    rows = list(DictReader(open("file_{i}.csv"), ["a", "b"]))  # csv file, dicts\n'
        f'    assert rows == [dict(a="1", b="2")]  # read csv file dicts\n'
        for i in range(5)
    ]
    return "from csvlib import DictReader\n\n\n" + "\n\n".join(tests)


DEPRECATED_INIT = '''"""Old build tools."""

import warnings

warnings.warn(
    "the oldtools package is deprecated",
    DeprecationWarning,
    2,
)
'''
DEPRECATED_SPAWN = '''def find_executable(executable, path=None):
    """Locate an executable program on the PATH search path."""
    return _search(executable, path)
'''
MAINTAINED = '''def which(cmd, path=None):
    """Locate an executable program on the PATH."""
    return _lookup(cmd, path)
'''


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def code_kb(tmp_path_factory) -> Path:
    root = write(
        tmp_path_factory.mktemp("code"),
        {
            "hashing.py": HASHING,
            "reports.py": NOISE,
            "csvlib.py": CSV_LIBRARY,
            "test/test_csvlib.py": csv_test_module(),
            "oldtools/__init__.py": DEPRECATED_INIT,
            "oldtools/spawn.py": DEPRECATED_SPAWN,
            "shellutil.py": MAINTAINED,
        },
    )
    out = tmp_path_factory.mktemp("kb")
    build_index(out, directory=root, include=["**/*.py"], progress=False)
    return out


def search(kb_dir: Path, query: str, mode: str = "bm25", **changed) -> list:
    with KnowledgeBase.open(kb_dir) as kb:
        return kb.search(query, k=10, mode=mode, ranking=Ranking(**{**DEFAULT_RANKING.__dict__, **changed}))


def test_chunks_carry_their_signature_and_docstring():
    chunks = {c.name: c for c in chunk_python("hashing.py", HASHING)}
    digest = chunks["hashing.file_digest"]
    assert digest.signature == "def file_digest(fileobj, digest, /, *, _bufsize=2**18):"
    assert digest.doc == "Hash the contents of a file-like object. Returns a digest object."
    assert chunks["hashing"].doc == "Hash objects for messages." and chunks["hashing"].signature == ""
    klass = {c.name: c for c in chunk_python("csvlib.py", CSV_LIBRARY)}["csvlib.DictReader"]
    assert klass.signature == "class DictReader:" and klass.doc.startswith("Read the rows of a csv file")


@pytest.mark.parametrize("query", ["file digest", "FileDigest", "digest a file"])
def test_identifier_words_find_the_function(code_kb, query):
    hits = search(code_kb, query)
    assert hits[0].name == "hashing.file_digest", [h.name for h in hits]


def test_a_sha256_of_a_file_finds_the_hashing_module_and_file_digest(code_kb):
    names = [h.name for h in search(code_kb, "compute a sha256 of a file")]
    assert names[0].startswith("hashing.") and "hashing.file_digest" in names[:2], names


def test_without_identifier_splitting_a_camel_case_query_finds_nothing(code_kb):
    assert search(code_kb, "FileDigest", split_identifiers=False) == []


def test_docstring_and_signature_fields_outweigh_the_body(code_kb):
    # "digest" is in report()'s docstring and body; in file_digest it is in the name, signature and docstring.
    assert search(code_kb, "digest object")[0].name == "hashing.file_digest"
    plain = search(code_kb, "digest object", field_weights=(0.0, 0.0, 0.0, 1.0, 0.0))
    with_fields = search(code_kb, "digest object")
    assert with_fields[0].score > plain[0].score  # the fields add to the text's score


def test_file_aggregation_lifts_a_file_with_many_matching_chunks():
    # (chunk id, bm25, document, is_test): b.py has the best single chunk, a.py three good ones.
    rows = [(1, 8.5, "b.py", 0), (2, 8.0, "a.py", 0), (3, 7.0, "a.py", 0), (4, 6.0, "a.py", 0)]
    assert rank_chunks(rows, Ranking(file_weight=0.0))[0][0] == 1
    ranked = rank_chunks(rows, Ranking(file_weight=0.5))
    assert ranked[0] == (2, 8.0 + 0.5 * (8.0 + 3.5 + 1.5))  # its file: best three, each halved after the first
    assert [i for i, _ in ranked] == [2, 3, 1, 4]


def test_test_files_are_recognised():
    for path in ["test/test_csv.py", "pkg/tests/helpers.py", "test_x.py", "x_test.py", "conftest.py",
                 "idlelib/idle_test/htest.py", "ctypes/test/test_bytes.py"]:  # fmt: skip
        assert is_test_path(path), path
    for path in ["unittest/case.py", "doctest.py", "contest.py", "testing_notes.md", "latest.py"]:
        assert not is_test_path(path), path


def test_test_files_no_longer_crowd_out_the_library(code_kb):
    query = "read a csv file into dicts"
    crowded = search(code_kb, query, test_weight=1.0)
    assert crowded[0].path == "test/test_csvlib.py"  # what the index did before: the test suite first
    hits = search(code_kb, query)
    assert hits[0].path == "csvlib.py"
    assert any(h.path == "test/test_csvlib.py" for h in hits)  # down-weighted, still found
    for mode in ("bm25", "dense", "fused"):
        assert all(h.path != "test/test_csvlib.py" for h in search(code_kb, query, mode=mode, test_weight=0.0))


def test_a_test_file_names_the_library_file_it_tests():
    assert covered_paths("test/test_shutil.py") == ["shutil.py", "shutil/__init__.py"]
    assert covered_paths("test/test_email/test_utils.py") == [
        "email/utils.py", "email/utils/__init__.py", "email.py", "email/__init__.py",
    ]  # fmt: skip
    assert covered_paths("idlelib/idle_test/test_pyparse.py")[0] == "idlelib/pyparse.py"
    assert covered_paths("pkg/tests/io_test.py")[0] == "pkg/io.py"
    assert covered_paths("unittest/test/support.py") == []  # a test's helper, of no module in particular
    assert covered_paths("shutil.py") == []  # not a test


def test_covered_documents_resolve_exactly_then_by_a_unique_suffix():
    keys = {p: f"key:{p}" for p in ["shutil.py", "src/pkg/io.py", "email/__init__.py", "a/util.py", "b/util.py"]}
    keys |= {p: f"key:{p}" for p in ["test/test_shutil.py", "tests/test_io.py", "test/test_email/test_parser.py",
                                     "test/test_util.py", "test/test_nothing.py"]}  # fmt: skip
    assert covered_documents(keys) == {
        "key:test/test_shutil.py": "key:shutil.py",
        "key:tests/test_io.py": "key:src/pkg/io.py",  # the one library path ending in io.py
        "key:test/test_email/test_parser.py": "key:email/__init__.py",  # no email/parser.py: its package
    }  # test_util.py: two util.py, which one is unknown; test_nothing.py: nothing of that name


def test_test_evidence_lifts_the_tested_file_by_its_tests_scores():
    # (chunk id, bm25, document, is_test): lib.py matches weakly, other.py better; lib.py's test strongly.
    rows = [(1, 5.0, "other.py", 0), (2, 4.0, "lib.py", 0), (3, 9.0, "test_lib.py", 1), (4, 6.0, "test_lib.py", 1)]
    plain = Ranking(file_weight=0.0, test_weight=0.3, test_evidence=0.0)
    assert [i for i, _ in rank_chunks(rows, plain, covered={"test_lib.py": "lib.py"})] == [1, 2, 3, 4]
    ranked = rank_chunks(
        rows, Ranking(file_weight=0.0, test_weight=0.3, test_evidence=0.15), covered={"test_lib.py": "lib.py"}
    )
    assert ranked[0] == (2, 4.0 + 0.15 * (9.0 + 0.5 * 6.0))  # the tests' raw scores, summed as a file's
    assert dict(ranked)[3] == pytest.approx(0.3 * 9.0)  # the test chunks themselves stay down-weighted
    with pytest.raises(TissLMError, match="test_evidence"):
        Ranking(test_evidence=-1.0)


def test_a_library_function_named_unlike_the_question_is_found_through_its_tests(tmp_path):
    root = write(tmp_path / "src", {
        "shellutil.py": 'def which(cmd, path=None):\n    """Return the full path of cmd, or None."""\n    return _look(cmd, path)\n',
        "configfiles.py": 'def full_path(name):\n    """The full path of a config file."""\n    return _home() + name\n',
        "test/test_shellutil.py": "from shellutil import which\n\n\ndef test_locates_an_executable_program():\n"
        '    """An executable program on the search path is located."""\n    assert which("python")  # executable\n',
    })  # fmt: skip
    build_index(tmp_path / "kb", directory=root, progress=False)
    query = "locate the full path of an executable program"
    without = [h.path for h in search(tmp_path / "kb", query, test_evidence=0.0) if h.path != "test/test_shellutil.py"]
    assert without[0] == "configfiles.py"  # "full path" in its name and docstring
    with_tests = [h.path for h in search(tmp_path / "kb", query) if h.path != "test/test_shellutil.py"]
    assert with_tests[0] == "shellutil.py"


def test_test_files_can_be_left_out_of_the_index(tmp_path):
    root = write(tmp_path / "src", {"csvlib.py": CSV_LIBRARY, "test/test_csvlib.py": csv_test_module()})
    report = build_index(tmp_path / "kb", directory=root, index_tests=False, progress=False)
    assert report["documents"] == 1 and report["skipped"] == {"test": 1}
    with KnowledgeBase.open(tmp_path / "kb") as kb:
        assert kb.document_paths() == {"csvlib.py"}


def test_deprecated_modules_are_recognised_and_down_weighted(code_kb):
    assert is_deprecated_module("oldtools/__init__.py", DEPRECATED_INIT)
    assert is_deprecated_module("imp.py", "import warnings\nwarnings._deprecated(__name__, remove=(3, 12))\n")
    assert not is_deprecated_module("shellutil.py", MAINTAINED)
    assert not is_deprecated_module("x.py", "def f():\n    warnings.warn('old', DeprecationWarning)\n")  # not at import
    query = "locate an executable program on the PATH search path"
    assert search(code_kb, query, deprecated_weight=1.0)[0].path == "oldtools/spawn.py"  # its package warns
    assert search(code_kb, query)[0].path == "shellutil.py"


def test_the_ranking_is_stored_in_the_index_and_params_match_the_default(tmp_path):
    assert Ranking.from_json(KnowledgeBaseParams().ranking.model_dump()) == DEFAULT_RANKING
    root = write(tmp_path / "src", {"csvlib.py": CSV_LIBRARY, "test/test_csvlib.py": csv_test_module()})
    build_index(tmp_path / "kb", directory=root, ranking=Ranking(test_weight=0.0), progress=False)
    with KnowledgeBase.open(tmp_path / "kb") as kb:
        assert kb.ranking.test_weight == 0.0
        assert {h.path for h in kb.search("read a csv file into dicts", k=10)} == {"csvlib.py"}
    build_index(tmp_path / "kb", directory=root, ranking=DEFAULT_RANKING, progress=False)  # nothing else changed
    with KnowledgeBase.open(tmp_path / "kb") as kb:
        assert kb.ranking == DEFAULT_RANKING
    with pytest.raises(TissLMError, match="unknown field"):
        Ranking.from_json({"field_weights": {"body": 1.0}})
    with pytest.raises(TissLMError, match="test_weight"):
        Ranking(test_weight=2.0)


def test_grounding_worse_than_none_is_a_warning(tmp_path):
    root = write(tmp_path / "src", {"csvlib.py": CSV_LIBRARY})
    build_index(tmp_path / "kb", directory=root, progress=False)
    with KnowledgeBase.open(tmp_path / "kb") as kb:
        assert kb.grounding() is None and kb.grounding_warning() is None
    gain = {"bits_per_byte_without": 1.338, "bits_per_byte_with_context": 1.3427, "documents": 16, "window": 256}
    record_grounding(tmp_path / "kb", gain)
    with KnowledgeBase.open(tmp_path / "kb") as kb:
        warning = kb.grounding_warning()
    assert "worse" in warning and "1.3427" in warning and "1.3380" in warning
    record_grounding(tmp_path / "kb", gain | {"bits_per_byte_with_context": 1.30})
    with KnowledgeBase.open(tmp_path / "kb") as kb:
        assert kb.grounding_warning() is None


def test_the_heldout_query_set_labels_exist_in_this_stdlib():
    from tisslm.kb.chunk import chunk_document

    queries = load_queries(HELDOUT_QUERIES)
    assert len(queries) == 50 and len({q["id"] for q in queries}) == 50
    assert all(q["id"].startswith("h") for q in queries)  # no id shared with queries.jsonl
    for q in queries:
        names = {
            c.name for path in q["files"] for c in chunk_document(path, (STDLIB / path).read_text(encoding="utf-8"))
        }
        assert q["names"] and set(q["names"]) <= names, q["id"]


def test_an_index_of_the_previous_format_is_rebuilt_not_refused(tmp_path):
    import sqlite3

    root = write(tmp_path / "src", {"csvlib.py": CSV_LIBRARY, "hashing.py": HASHING})
    build_index(tmp_path / "kb", directory=root, progress=False)
    with sqlite3.connect(tmp_path / "kb" / "index.sqlite") as db:  # what `make run` left: format 1
        db.execute("UPDATE meta SET value = '1' WHERE key = 'format_version'")
    with pytest.raises(TissLMError, match="format 1"):
        KnowledgeBase.open(tmp_path / "kb")
    report = build_index(tmp_path / "kb", directory=root, progress=False)
    assert report["added"] == 2 and report["documents"] == 2
    with KnowledgeBase.open(tmp_path / "kb") as kb:
        assert kb.search("file digest", k=1)[0].name == "hashing.file_digest"


def test_the_server_answers_the_grounding_warning_with_retrieval(tmp_path):
    import asyncio
    from types import SimpleNamespace

    from tisslm.core.config import ServeParams
    from tisslm.core.tokenizer import byte_level_tokenizer
    from tisslm.serve.schemas import RetrieveRequest
    from tisslm.serve.serving import Serving

    root = write(tmp_path / "src", {"csvlib.py": CSV_LIBRARY})
    build_index(tmp_path / "kb", directory=root, progress=False)
    engine = SimpleNamespace(metrics=None, model=SimpleNamespace(config=SimpleNamespace(max_seq_len=64)))
    request = RetrieveRequest(query="csv dicts", k=1)
    with KnowledgeBase.open(tmp_path / "kb") as kb:
        serving = Serving(engine, byte_level_tokenizer(), ServeParams(), kb)
        answer = asyncio.run(serving.retrieve(request))
        assert answer.data[0].path == "csvlib.py" and answer.grounding_warning is None
    gain = {"bits_per_byte_without": 1.25, "bits_per_byte_with_context": 1.5, "documents": 2, "window": 64}
    record_grounding(tmp_path / "kb", gain)
    with KnowledgeBase.open(tmp_path / "kb") as kb:
        serving = Serving(engine, byte_level_tokenizer(), ServeParams(), kb)
        assert "1.5000 with retrieved context" in asyncio.run(serving.retrieve(request)).grounding_warning
        assert "1.2500 without" in asyncio.run(serving.kb_info()).grounding_warning

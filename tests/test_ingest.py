"""Ingest: every document a source offers is kept or skipped with a reason, and the counts reconcile."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tisslm.core.config import DirSource, FilesSource, HFSource, IngestParams, StdlibSource
from tisslm.core.errors import TissLMError
from tisslm.data.ingest import ingest
from tisslm.data.shards import read_shards, write_shards

GOOD = "def add(a, b):\n    return a + b\n"


@pytest.fixture
def messy_dir(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "pkg" / "tests").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text(GOOD)
    (root / "pkg" / "b.py").write_text("# ünïcode ✓\n" + GOOD)
    (root / "pkg" / "tests" / "test_a.py").write_text(GOOD)  # excluded by glob, not seen
    (root / "notes.md").write_text("not included")  # not matched by include, not seen
    (root / "latin1.py").write_bytes("café = 1\n".encode("latin-1"))
    (root / "binary.py").write_bytes(b"x = 1\x00\x01\x02\n")
    (root / "empty.py").write_bytes(b"")
    (root / "blank.py").write_text("   \n\n\t\n")
    (root / "huge.py").write_text("x = 1\n" * 400)
    (root / "locked.py").write_text(GOOD)
    (root / "dangling.py").symlink_to(root / "does-not-exist.py")
    return root


def test_every_kind_of_bad_file_is_skipped_with_its_reason(messy_dir, monkeypatch):
    original = Path.read_bytes

    def read_bytes(self):  # root reads any file, so a permission error is simulated for one path
        if self.name == "locked.py":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    params = IngestParams(
        sources=[DirSource(type="dir", path=messy_dir, include=["**/*.py"], exclude=["**/tests/**"])],
        max_file_bytes=1000,
    )
    table, report = ingest(params)
    assert report.skipped == {
        "not_utf8": 1, "binary": 1, "empty": 2, "too_large": 1, "unreadable": 1, "broken_symlink": 1,
    }  # fmt: skip
    assert report.seen == report.kept + sum(report.skipped.values()) == 9
    assert sorted(table["path"]) == ["pkg/a.py", "pkg/b.py"]
    assert report.skipped_examples["broken_symlink"] == [f"dir:{messy_dir}:dangling.py"]
    assert all(len(i) == 16 for i in table["id"]) and len(set(table["id"])) == 2


def test_files_source_reads_txt_jsonl_parquet_and_skips_bad_records(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document\n")
    lines = [json.dumps({"text": "first record"}), "{not json", json.dumps({"body": "no text field"}),
             json.dumps({"text": 7}), json.dumps({"text": "\ud800 lone surrogate"}), json.dumps({"text": "last"})]  # fmt: skip
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": ["row zero", "", "row two"]}), tmp_path / "c.parquet")
    paths = [tmp_path / n for n in ("a.txt", "b.jsonl", "c.parquet", "missing.txt")]
    table, report = ingest(IngestParams(sources=[FilesSource(type="files", paths=paths)]))
    assert table["text"] == ["plain text document\n", "first record", "last", "row zero", "row two"]
    assert report.skipped == {"bad_record": 3, "not_utf8": 1, "empty": 1, "missing": 1}
    assert report.seen == report.kept + sum(report.skipped.values()) == 11


def test_hf_source_loads_through_datasets_from_local_files(tmp_path):
    data = tmp_path / "local.jsonl"
    data.write_text("".join(json.dumps({"content": f"document number {i}"}) + "\n" for i in range(5)))
    source = HFSource(type="hf", name="json", data_files=[str(data)], text_field="content", max_docs=3)
    table, report = ingest(IngestParams(sources=[source]))
    assert table["text"] == ["document number 0", "document number 1", "document number 2"]
    assert table["source"] == ["hf:json"] * 3 and report.kept == 3


def test_local_hf_source_without_loadable_data_is_one_line_error(tmp_path):
    (tmp_path / "empty-dataset").mkdir()
    source = HFSource(type="hf", name=str(tmp_path / "empty-dataset"))
    with pytest.raises(TissLMError, match="cannot load") as err:
        ingest(IngestParams(sources=[source]))
    assert "\n" not in str(err.value)


def test_missing_directory_is_one_line_error(tmp_path):
    with pytest.raises(TissLMError, match="not a directory"):
        ingest(IngestParams(sources=[DirSource(type="dir", path=tmp_path / "nope")]))


def test_ingest_is_deterministic_and_round_trips_through_shards(messy_dir, tmp_path):
    params = IngestParams(sources=[DirSource(type="dir", path=messy_dir, include=["**/*.py"])])
    first, _ = ingest(params)
    second, _ = ingest(params)
    assert first.to_dict() == second.to_dict()
    write_shards(first, tmp_path / "raw", shard_rows=2)
    assert len(first) == 5  # a.py, b.py, tests/test_a.py, locked.py, huge.py
    assert len(list((tmp_path / "raw").glob("shard-*.parquet"))) == 3
    assert read_shards(tmp_path / "raw").to_dict() == first.to_dict()


def test_corrupt_shard_is_one_line_error(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "shard-00000.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(TissLMError, match="not a readable parquet file"):
        read_shards(tmp_path / "raw")
    with pytest.raises(TissLMError, match="no shard"):
        read_shards(tmp_path / "elsewhere")


def test_hub_dataset_without_a_reachable_hub_fails_fast_in_one_line(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # RFC 2606: never resolves
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    source = HFSource(type="hf", name="some-org/some-dataset")
    with pytest.raises(TissLMError, match=r"hf 'some-org/some-dataset': the hub \(hub.invalid\) is unreachable") as err:
        ingest(IngestParams(sources=[source]))
    assert "\n" not in str(err.value)


def test_stdlib_parts_split_the_library_from_its_test_suites(monkeypatch, tmp_path):
    stdlib = tmp_path / "lib"
    for relative in ["os.py", "json/decoder.py", "test/test_os.py", "idlelib/idle_test/test_run.py",
                     "unittest/test/test_case.py", "site-packages/pkg/mod.py", "__pycache__/x.py"]:  # fmt: skip
        (stdlib / relative).parent.mkdir(parents=True, exist_ok=True)
        (stdlib / relative).write_text(GOOD)
    monkeypatch.setattr("sysconfig.get_paths", lambda: {"stdlib": str(stdlib)})
    params = IngestParams(sources=[StdlibSource(), StdlibSource(part="tests", train_only=True)])
    table, report = ingest(params)
    assert dict(zip(table["path"], table["source"], strict=True)) == {
        "json/decoder.py": "stdlib", "os.py": "stdlib",
        "idlelib/idle_test/test_run.py": "stdlib-tests", "test/test_os.py": "stdlib-tests",
        "unittest/test/test_case.py": "stdlib-tests",
    }  # fmt: skip
    assert dict(zip(table["path"], table["train_only"], strict=True))["test/test_os.py"] is True
    assert dict(zip(table["path"], table["train_only"], strict=True))["os.py"] is False
    assert report.by_source["stdlib-tests"]["description"].endswith("(train split only)")

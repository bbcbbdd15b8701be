"""`tisslm kb build | search | stats` as a user runs them: JSON out, one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from tisslm.core.errors import TissLMError
from tisslm.kb.commands import app


def kb(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tisslm.cli", "kb", *args], capture_output=True, text=True, timeout=120
    )


def test_build_search_stats_and_errors(tmp_path):
    src = tmp_path / "src"
    (src / "vendor").mkdir(parents=True)
    (src / "tariffs.py").write_text(
        'def customs_duty(value, rate):\n    """Duty owed on imported goods."""\n    return value * rate\n'
    )
    (src / "vendor" / "tariffs_copy.py").write_text("def customs_duty_vendor():\n    return 0\n")
    (src / "notes.md").write_text("# Notes\n\nNothing about duties here.\n")
    out = tmp_path / "kb"

    built = kb("build", "--dir", str(src), "--include", "**/*.py", "--exclude", "vendor/", "--out", str(out), "--json")
    assert built.returncode == 0, built.stderr
    report = json.loads(built.stdout)
    assert (report["documents"], report["added"], report["chunks"]) == (1, 1, 1)

    found = kb("search", "--kb", str(out), "--k", "3", "--mode", "bm25", "--json", "customs duty on imported goods")
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert hits[0] | {"score": 0} == {"path": "tariffs.py", "name": "tariffs.customs_duty", "start_line": 1,
                                      "end_line": 3, "score": 0, "text": hits[0]["text"]}  # fmt: skip
    assert hits[0]["score"] > 0

    stats = kb("stats", "--kb", str(out), "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["documents"] == 1 and json.loads(stats.stdout)["embedding_model"].startswith(
        "wordllama"
    )

    for args, message in [
        (("search", "--kb", str(tmp_path / "nowhere"), "anything"), "no knowledge base here"),
        (("search", "--kb", str(out), "  "), "query is empty"),
    ]:
        failed = kb(*args)
        assert failed.returncode == 2, (args, failed.stdout, failed.stderr)
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_build_needs_exactly_one_source(tmp_path):
    for args in (["--out", str(tmp_path)], ["--dir", str(tmp_path), "--clean", str(tmp_path), "--out", str(tmp_path)]):
        result = CliRunner().invoke(app, ["build", *args])
        assert isinstance(result.exception, TissLMError) and "exactly one of --dir PATH or --clean PATH" in str(
            result.exception
        )
    result = CliRunner().invoke(app, ["build", "--dir", str(tmp_path), "--val-fraction", "0.1", "--out", str(tmp_path)])
    assert isinstance(result.exception, TissLMError) and "--val-fraction applies to --clean only" in str(
        result.exception
    )


def test_search_imports_neither_torch_nor_the_build_stack(tmp_path):
    """`kb search` loads the index and its embedders' files only: not torch, not the build's anonymiser,
    not the wordllama package (its import pulls in requests: 0.3 s), not the params schema."""
    from test_cli import imported

    src = tmp_path / "src"
    src.mkdir()
    (src / "tariffs.py").write_text('def customs_duty(value, rate):\n    """Duty owed."""\n    return value * rate\n')
    out = tmp_path / "kb"
    assert kb("build", "--dir", str(src), "--out", str(out)).returncode == 0
    for mode in ("bm25", "fused"):
        result, modules = imported("kb", "search", "--kb", str(out), "--mode", mode, "customs duty")
        assert result.returncode == 0 and "tariffs.py:1-3" in result.stdout, result.stderr
        heavy = {"torch", "detect_secrets", "tisslm.kb.build", "tisslm.data.anonymize", "wordllama", "requests"}
        assert sorted(modules & (heavy | {"tisslm.core.config"})) == [], mode

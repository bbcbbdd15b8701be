"""The knowledge base's figures in README.md and docs/knowledge_base.md are generated from
metrics/kb.json and benchmarks/results/kb.json (`make docs`, tools/kb_figures.py): they must match."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_tool():
    spec = importlib.util.spec_from_file_location("kb_figures", ROOT / "tools" / "kb_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_docs_state_the_figures_of_the_metrics_files():
    assert load_tool().stale() == []  # else: run `make docs` (python tools/kb_figures.py)


def test_a_changed_metric_makes_the_block_stale(tmp_path, monkeypatch):
    tool = load_tool()
    metrics = json.loads(tool.METRICS.read_text(encoding="utf-8"))
    metrics["chunks"] += 1
    changed = tmp_path / "kb.json"
    changed.write_text(json.dumps(metrics))
    monkeypatch.setattr(tool, "METRICS", changed)
    assert f"{metrics['chunks']:,} chunks" in "\n".join(tool._pipeline(metrics))
    assert "README.md: kb-figures:pipeline" in tool.stale()


def test_no_machine_paths_in_the_benchmark_results():
    text = (ROOT / "benchmarks" / "results" / "kb.json").read_text(encoding="utf-8")
    for fragment in ("/tmp", "/home/", "/root/", "/work/"):
        assert fragment not in text


def test_a_missing_block_is_named(tmp_path):
    tool = load_tool()
    with pytest.raises(SystemExit, match="kb-figures:pipeline"):
        tool.render("no blocks here\n", {"pipeline": ["x"]}, "README.md")

"""dvc.yaml's code deps cover every project file each stage runs, so `dvc status` sees code changes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO, copy_project
from dvc_deps import undeclared


def test_every_stage_declares_the_project_code_it_imports():
    assert undeclared(REPO) == {stage: [] for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]}


def test_every_declared_path_exists():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    code = [d for s in stages.values() for d in s["deps"] if d.startswith(("src/", "stages/"))]
    assert code and [d for d in code if not (REPO / d).exists()] == []


def test_a_planted_import_is_reported_for_its_stage(tmp_path):
    project = copy_project(tmp_path / "project")
    stage = project / "stages" / "bias.py"
    stage.write_text(
        stage.read_text().replace("\ndef main", "\nimport tisslm.release.card  # planted\n\n\ndef main", 1)
    )
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("dvc_deps.py"))], cwd=project, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    missing = json.loads(result.stdout)
    assert missing["bias"] == ["src/tisslm/release/__init__.py", "src/tisslm/release/card.py"]
    assert all(files == [] for stage, files in missing.items() if stage != "bias")


def test_searching_the_index_leaves_no_file_that_dvc_sees(tmp_path):
    """A search opens models/kb read-only, and SQLite leaves its WAL and shared-memory files beside
    the index: dvc must not count them, or every search would make the knowledge_base stage's output
    "modified" and the next `dvc repro` would rebuild the index."""
    from tisslm.kb import KnowledgeBase, build_index

    build_index(tmp_path / "kb", directory=REPO / "src" / "tisslm" / "kb", include=["chunk.py"], progress=False)
    with KnowledgeBase.open(tmp_path / "kb") as kb:
        kb.search("split a module into chunks")
    left = sorted(p.name for p in (tmp_path / "kb").iterdir())
    assert left[0] == "index.sqlite" and len(left) > 1  # the reader left its files: the case at hand

    def ignored(name: str) -> bool:
        check = [sys.executable, "-m", "dvc", "check-ignore", "-q", f"models/kb/{name}"]
        return subprocess.run(check, cwd=REPO, capture_output=True).returncode == 0

    assert [name for name in left if ignored(name)] == left[1:]

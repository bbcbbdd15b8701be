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

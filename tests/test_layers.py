"""The package's layers (pyproject.toml's import-linter contracts) hold, and a backward import breaks them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, copy_project

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(project: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{project / 'src'}{os.pathsep}{project}"}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=project, env=env, capture_output=True, text=True)


def test_the_layers_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_core_module_importing_the_server_breaks_the_layers(tmp_path):
    project = copy_project(tmp_path / "project")
    model = project / "src" / "tisslm" / "core" / "model.py"
    model.write_text(model.read_text() + "\nimport tisslm.serve.app  # planted: core must not know the server\n")
    result = lint_imports(project)
    assert result.returncode == 1
    assert "tisslm is layered" in result.stdout and "BROKEN" in result.stdout
    assert "tisslm.core.model -> tisslm.serve.app" in result.stdout


def test_the_package_importing_a_stage_breaks_the_contract(tmp_path):
    project = copy_project(tmp_path / "project")
    cli = project / "src" / "tisslm" / "cli.py"
    cli.write_text(cli.read_text() + "\nimport stages.train  # planted: the package must not reach into the repo\n")
    result = lint_imports(project)
    assert result.returncode == 1 and "never imports the repo-level stages BROKEN" in result.stdout

"""The ingest and clean stages run as a user runs them: `dvc repro` in a workspace of their own."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import copy_project, stage_command


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "ITERATIVE_DO_NOT_TRACK": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@contextmanager
def edited_params(workspace: Path, edit: Callable[[dict], None]) -> Iterator[None]:
    """params.yaml changed by `edit` for the duration of the block, then restored."""
    path = workspace / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    edit(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        yield
    finally:
        path.write_text(original)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A copy of the project (code, dvc.yaml, params.yaml) with a small `dir` corpus of its own."""
    root = tmp_path_factory.mktemp("ws")
    project = copy_project(root / "project")
    corpus = root / "corpus"
    rng = random.Random(0)
    for i in range(60):
        lines = [
            f"def function_{i}_{j}(value):\n    return value * {rng.randint(2, 99)} + {rng.randint(0, 9)}\n"
            for j in range(6)
        ]
        (corpus / f"pkg{i % 3}").mkdir(parents=True, exist_ok=True)
        (corpus / f"pkg{i % 3}" / f"mod{i}.py").write_text(
            "".join(lines) + f"# maintainer: dev{i}@corp{i}.example.com\n"
        )
    (corpus / "pkg0" / "copy_of_mod0.py").write_text((corpus / "pkg0" / "mod0.py").read_text())
    (corpus / "pkg1" / "broken.py").write_bytes(b"\xff\xfe not utf-8")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ingest"].update(sources=[{"type": "dir", "path": str(corpus), "include": ["**/*.py"]}], min_rows=10)
    params["clean"]["min_rows"] = 10
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert run(["git", "init", "-q"], project).returncode == 0
    return project


def test_dvc_repro_clean_on_a_dir_source(workspace):
    result = run(["dvc", "repro", "clean"], workspace)
    assert result.returncode == 0, result.stderr + result.stdout
    ingest = json.loads((workspace / "metrics/ingest.json").read_text())
    assert ingest["seen"] == 62 and ingest["kept"] == 61 and ingest["skipped"] == {"not_utf8": 1}
    clean = json.loads((workspace / "metrics/clean.json").read_text())
    assert clean["docs_in"] == 61 and clean["dropped"] == {"exact_duplicate": 1} and clean["docs_out"] == 60
    assert clean["redactions"]["EMAIL"] == 60
    assert json.loads((workspace / "metrics/validation_clean.json").read_text())["success"]
    assert (workspace / "reports/data_docs/index.html").is_file()
    assert sorted(p.name for p in (workspace / "data/clean").iterdir()) == ["shard-00000.parquet"]

    again = run(["dvc", "repro", "clean"], workspace)
    assert again.returncode == 0 and "Running stage" not in again.stdout


def test_failed_validation_exits_1_and_keeps_the_previous_output(workspace):
    shard = workspace / "data/clean/shard-00000.parquet"
    before = shard.read_bytes()
    result = run(stage_command(workspace, "clean"), workspace)
    assert result.returncode == 0, result.stderr
    with edited_params(workspace, lambda p: p["clean"].update(min_rows=1000)):
        failed = run(stage_command(workspace, "clean"), workspace)
    assert failed.returncode == 1
    assert "expect_table_row_count_to_be_between(table)" in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("error: clean data failed validation")
    assert shard.read_bytes() == before


def test_invalid_params_exit_2_with_one_line(workspace):
    with edited_params(workspace, lambda p: p["clean"]["dedup"].update(threshold=1.5)):
        result = run(stage_command(workspace, "clean"), workspace)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: params.yaml: clean.dedup.threshold=1.5: Input should be less than or equal to 1"
    )

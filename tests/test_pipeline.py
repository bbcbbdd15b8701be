"""The Prefect flows over the DVC stages, end to end on a tiny configuration, against a real
`mlflow server` on loopback and a temporary Prefect server.

One workspace serves the module's tests in order: the pipeline flow makes every artifact, DVC then
finds nothing to do, a DVC experiment changes a param and is discarded, the HPO flow studies the
trained data, and a broken param makes the flow fail naming its stage.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import copy_project, free_port, wait_until_up
from synthetic import code_doc

from tisslm.tracking import SERVER_ENVIRONMENT

TINY_PARAMS = {
    "ingest": {"min_rows": 10},
    "clean": {"min_rows": 10, "workers": 1},
    "tokenizer": {"vocab_size": 320},
    "model": {"vocab_size": 320, "d_model": 48, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 96,
              "max_seq_len": 128},
    "train": {"max_steps": 12, "seq_len": 32, "batch_size": 8, "warmup_steps": 2, "eval_interval": 6,
              "eval_batches": 2, "log_interval": 3, "checkpoint_interval": 6, "nproc": 1, "precision": "fp32",
              "lr": 0.01},
    "sft": {"steps": 0},  # the corpus has no docstrings: test_pretrained_pipeline.py fine-tunes
    "dpo": {"steps": 0},
    "evaluate": {"prompts": ["def "], "max_new_tokens": 8,
                 "humaneval": {"problems": 2, "samples": 2, "max_new_tokens": 8, "sft_examples": 2}},
    "quantize": {"decode_tokens": 8, "eval_documents": 5},
    "bias": {"bootstrap": 50},
    "knowledge_base": {"context_documents": 2, "k": 2},
    "safety": {"watermark_samples": 4, "watermark_lengths": [20, 40], "red_team_max_tokens": 8},
    "pipeline": {"retries": 1, "retry_delay_s": 1.0},
    "hpo": {"trial_steps": 12, "eval_interval": 3, "startup_trials": 1, "warmup_steps": 0,
            "search_space": {"train.lr": {"low": 0.001, "high": 0.03, "log": True},
                             "train.warmup_steps": {"choices": [1, 4]}}},
}  # fmt: skip
STAGES = ["ingest", "clean", "tokenizer", "tokenize", "train", "sft", "dpo", "evaluate", "bias", "knowledge_base", "safety",
          "quantize", "export", "model_card", "register"]  # fmt: skip


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, proxied artifacts) on a free loopback port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        cwd=root, stdout=(root / "server.log").open("w"), stderr=subprocess.STDOUT,
        env={**os.environ, **SERVER_ENVIRONMENT},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/health", server, root / "server.log", "mlflow server")
    yield url
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, mlflow_server, prefect_harness):
    """A git repository holding a copy of the project on a tiny config, the flows' working directory,
    logging to the MLflow server."""
    root = tmp_path_factory.mktemp("pipeline")
    project = copy_project(root / "project")
    corpus = root / "corpus"
    rng = random.Random(0)
    for i in range(80):
        (corpus / f"pkg{i % 4}").mkdir(parents=True, exist_ok=True)
        (corpus / f"pkg{i % 4}" / f"mod{i}.py").write_text("\n".join(code_doc(rng, n_lines=25)) + "\n")
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in TINY_PARAMS.items():
        params[section].update(values)
    # Relative to the project, so document ids (and the train/val split) do not depend on the temp dir's name.
    params["ingest"]["sources"] = [{"type": "dir", "path": "../corpus", "include": ["**/*.py"]}]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny project"]):
        assert run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *command[1:]], project).returncode == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        patch.setenv("ITERATIVE_DO_NOT_TRACK", "1")
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        yield project


def children(client, parent_run_id: str) -> list:
    experiment = client.get_experiment_by_name("tisslm")
    return client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")


def assert_dvc_finds_nothing_stale(workspace: Path) -> None:
    status = run([sys.executable, "-m", "dvc", "status"], workspace)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout


def back_to_the_committed_outputs(workspace: Path) -> None:
    """Discard what a test changed (params, dvc.lock, the outputs DVC removed before a stage ran), so
    that the tests after it find nothing stale and rerun no stage."""
    assert run(["git", "reset", "--hard", "-q"], workspace).returncode == 0
    checkout = run([sys.executable, "-m", "dvc", "checkout", "--force"], workspace)
    assert checkout.returncode == 0, checkout.stderr
    assert_dvc_finds_nothing_stale(workspace)


def test_pipeline_flow_makes_and_registers_the_model(workspace, mlflow_server):
    from mlflow import MlflowClient

    from tisslm.flows.pipeline import tisslm_pipeline

    outcome = tisslm_pipeline()

    assert [s.stage for s in outcome.stages] == STAGES
    assert all(s.ran for s in outcome.stages)
    assert outcome.decision["promoted"] and outcome.decision["challenger_version"] == "1"
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)  # over HTTP
    assert client.get_model_version_by_alias("tisslm", "champion").version == "1"
    assert client.get_model_version_by_alias("tisslm", "challenger").version == "1"
    parent = client.get_run(outcome.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["promoted"] == 1.0
    runs = {run.info.run_name: run for run in children(client, outcome.mlflow_run_id)}
    assert sorted(runs) == sorted(STAGES)
    train = runs["train"]
    assert train.data.params["train.max_steps"] == "12"  # logged by the trainer into the flow's run
    assert len(client.get_metric_history(train.info.run_id, "train_loss")) == 4  # steps 3, 6, 9, 12
    train_json = json.loads((workspace / "metrics/train.json").read_text())
    assert train.data.metrics["val_bits_per_byte"] == pytest.approx(train_json["val_bits_per_byte"])
    assert train.data.tags["dvc.out.models/base"]  # lineage: the md5 dvc.lock holds for the output
    # Each stage's whole log is in its run, DVC's advice included (the flow's own log leaves that out),
    # and none of MLflow's account of its own doings.
    logs = {
        stage: Path(
            client.download_artifacts(runs[stage].info.run_id, "stage.log", str(workspace / f"../{stage}"))
        ).read_text()
        for stage in ("train", "knowledge_base", "safety", "register")
    }
    assert all("git add dvc.lock" in log for log in logs.values())
    assert "train: val " in logs["train"] and "system metrics" not in logs["train"]
    assert "register: tisslm version 1" in logs["register"] and "Validating input example" not in logs["register"]
    # The tiny corpus holds none of the files the query sets ask about: said so, not an empty figure.
    assert (
        "knowledge_base: project queries not scored: none of the 232 is about an indexed file" in logs["knowledge_base"]
    )
    assert re.search(r"false positives: plain_samples \d+\.\d%.*repetitive samples: \d+", logs["safety"])
    assert [m.name for m in client.search_model_versions("name='tisslm'")] == ["tisslm"]
    model_version = client.get_model_version("tisslm", "1")
    assert model_version.run_id == runs["register"].info.run_id  # the register stage logged into its child run
    for name in ("MODEL_CARD.md", "DATASHEET.md", "model/model.safetensors", "export/gguf"):
        assert (workspace / "models" / name).exists(), name

    # The flow made exactly what `dvc repro` makes: DVC finds nothing stale and runs nothing.
    assert_dvc_finds_nothing_stale(workspace)
    repro = run([sys.executable, "-m", "dvc", "repro"], workspace)
    assert repro.returncode == 0 and "Running stage" not in repro.stdout, repro.stdout
    commit = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "pipeline outputs"]
    assert run(["git", "add", "-A"], workspace).returncode == 0
    assert run(commit, workspace).returncode == 0


def test_retrain_flow_pulls_reuses_and_pushes_to_the_remote(workspace):
    """`tisslm-retrain` on an up-to-date project: nothing reruns, and the outputs reach the DVC remote."""
    from tisslm.flows.pipeline import tisslm_retrain

    remote = workspace / ".dvc-storage"  # the default remote in .dvc/config
    assert not remote.exists()
    outcome = tisslm_retrain()
    assert not any(s.ran for s in outcome.stages) and outcome.decision["challenger_version"] == "1"
    assert len(list(remote.rglob("*"))) > 20
    cloud = run([sys.executable, "-m", "dvc", "status", "--cloud"], workspace)
    assert cloud.returncode == 0 and "Cache and remote 'local' are in sync" in cloud.stdout, cloud.stdout


def test_dvc_experiment_metrics_and_plots(workspace):
    experiment = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "train.max_steps=18", "train"], workspace)
    assert experiment.returncode == 0, experiment.stdout + experiment.stderr
    assert "resumed from models/checkpoints/step-12" in experiment.stdout + experiment.stderr
    assert json.loads((workspace / "metrics/train.json").read_text())["steps"] == 18
    assert yaml.safe_load((workspace / "params.yaml").read_text())["train"]["max_steps"] == 18

    diff = run([sys.executable, "-m", "dvc", "metrics", "diff", "--json"], workspace)
    assert diff.returncode == 0, diff.stderr
    changed = json.loads(diff.stdout)["metrics/train.json"]
    assert changed["steps"] == {"old": 12, "new": 18, "diff": 6}

    plots = run([sys.executable, "-m", "dvc", "plots", "show", "--json"], workspace)
    assert plots.returncode == 0, plots.stderr
    assert "plots/train_loss.csv" in plots.stdout
    html = run([sys.executable, "-m", "dvc", "plots", "show", "-o", "dvc_plots"], workspace)
    assert html.returncode == 0 and (workspace / "dvc_plots/index.html").is_file()
    back_to_the_committed_outputs(workspace)  # as a user discards an experiment


def test_hpo_flow_runs_pruned_or_complete_trials_and_resumes(workspace, mlflow_server):
    from mlflow import MlflowClient

    from tisslm.flows.hpo import tisslm_hpo

    result = tisslm_hpo(n_trials=4)

    trials = result["trials"]
    assert trials["complete"] + trials["pruned"] == 4 and trials["fail"] == 0 and trials["complete"] >= 1
    best = result["best"]
    assert set(best["params"]) == {"train.lr", "train.warmup_steps"}
    assert result["apply"].startswith("dvc exp run -S ") and "train.lr=" in result["apply"]
    assert json.loads((workspace / "metrics/hpo.json").read_text()) == result
    client = MlflowClient(tracking_uri=mlflow_server)
    parent = client.search_runs([client.get_experiment_by_name("tisslm").experiment_id], "attributes.run_name = 'hpo'")[
        0
    ]
    trial_runs = [r for r in children(client, parent.info.run_id) if r.info.run_name.startswith("trial-")]
    assert sorted(r.data.tags["optuna.state"] for r in trial_runs) == sorted(
        ["COMPLETE"] * trials["complete"] + ["PRUNED"] * trials["pruned"]
    )
    assert {r.info.status for r in trial_runs} <= {"FINISHED", "KILLED"}

    # The study is in its journal: asking for 5 finished trials runs exactly one more.
    again = tisslm_hpo(n_trials=5)
    assert again["trials"]["complete"] + again["trials"]["pruned"] == 5


def test_a_failing_stage_fails_the_flow_naming_it(workspace, mlflow_server):
    from mlflow import MlflowClient

    from tisslm.flows.pipeline import StageFailed, tisslm_pipeline

    try:
        with pytest.raises(StageFailed, match=r"stage 'train' failed: dvc repro exited with \d+") as failure:
            tisslm_pipeline(["train.seq_len=200"])  # longer than model.max_seq_len=128: the trainer refuses
        assert "train.seq_len=200 exceeds model.max_seq_len=128" in "\n".join(failure.value.tail)
    finally:
        back_to_the_committed_outputs(workspace)  # DVC removed train's outputs before the trainer refused
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("tisslm").experiment_id
    failed = client.search_runs([experiment], "attributes.run_name = 'pipeline'", order_by=["start_time DESC"])[0]
    assert failed.info.status == "FAILED" and failed.data.tags["failed_stage"] == "train"
    attempts = [r for r in children(client, failed.info.run_id) if r.info.run_name == "train"]
    assert len(attempts) == 1  # a user's mistake is not retried


def test_a_transient_failure_is_retried(workspace, mlflow_server):
    """Another DVC process holding the workspace's lock fails a stage's first attempt ("Unable to
    acquire lock"): the flow retries it once the lock is free, and completes."""
    import threading

    from dvc.repo import Repo
    from mlflow import MlflowClient

    from tisslm.flows.pipeline import tisslm_pipeline

    client = MlflowClient(tracking_uri=mlflow_server)
    since = int(time.time() * 1000)
    lock = Repo(str(workspace)).lock
    lock.lock()  # what a `dvc` command running elsewhere in the workspace holds

    def release_after_the_first_failure() -> None:
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                experiment = client.get_experiment_by_name("tisslm")  # the flow makes it on a fresh store
                query = f"attributes.status = 'FAILED' and attributes.start_time > {since}"
                if experiment is not None and client.search_runs([experiment.experiment_id], query):
                    break
                time.sleep(0.2)
        finally:
            lock.unlock()

    releaser = threading.Thread(target=release_after_the_first_failure)
    releaser.start()
    original = (workspace / "params.yaml").read_text()
    try:
        outcome = tisslm_pipeline(["pipeline.retry_delay_s=3"])
    finally:
        releaser.join()
        (workspace / "params.yaml").write_text(original)
    first = outcome.stages[0].stage
    experiment = client.get_experiment_by_name("tisslm")
    runs = client.search_runs([experiment.experiment_id], f"attributes.start_time > {since}")
    attempts = sorted((r for r in runs if r.info.run_name == first), key=lambda r: r.info.start_time)
    assert [r.info.status for r in attempts] == ["FAILED", "FINISHED"]
    assert not any(s.ran for s in outcome.stages)  # nothing was stale: the lock alone failed the stage
    log = Path(client.download_artifacts(attempts[0].info.run_id, "stage.log", str(workspace.parent)))
    assert "Unable to acquire lock" in log.read_text()


def test_bad_override_is_refused_before_anything_is_written(workspace):
    from tisslm.core.errors import ConfigError
    from tisslm.flows.pipeline import tisslm_pipeline

    before = (workspace / "params.yaml").read_text()
    with pytest.raises(ConfigError, match=r"train.max_steps='many'"):
        tisslm_pipeline(["train.max_steps=many"])
    assert (workspace / "params.yaml").read_text() == before


def test_prefect_yaml_deploys_to_a_server(workspace):
    """`prefect deploy` registers every deployment in pipelines/prefect.yaml on a real Prefect server,
    and `prefect worker start` on its process pool runs the pipeline deployment to COMPLETED, or to
    FAILED naming the stage when one breaks."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PWD": str(workspace)}  # as a shell sets it
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    for command in (["work-pool", "create", "tisslm-process", "--type", "process"],
                    ["deploy", "--all", "--prefect-file", "pipelines/prefect.yaml"]):  # fmt: skip
        result = subprocess.run(
            [*prefect, *command], cwd=workspace, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with get_client(sync_client=True) as client:
        deployments = {d.name: d for d in client.read_deployments()}
        flows = {f.id: f.name for f in client.read_flows()}
    assert {"tisslm-retrain", "tisslm-hpo", "tisslm-pipeline"} <= set(deployments)
    retrain = deployments["tisslm-retrain"]
    assert flows[retrain.flow_id] == "tisslm-retrain" and retrain.work_pool_name == "tisslm-process"
    assert [s.schedule.cron for s in retrain.schedules] == ["0 2 * * *"]
    assert flows[deployments["tisslm-hpo"].flow_id] == "tisslm-hpo" and not deployments["tisslm-hpo"].schedules
    assert retrain.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(workspace)}}]

    def run_deployment_through_a_worker():
        started = subprocess.run(
            [*prefect, "deployment", "run", "tisslm-pipeline/tisslm-pipeline"],
            cwd=workspace, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)
        worker = subprocess.run(
            [*prefect, "worker", "start", "--pool", "tisslm-process", "--run-once"],
            cwd=workspace, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run_id), worker.stdout + worker.stderr

    # A real worker on the process pool picks up a run of the pipeline deployment and completes it.
    run, log = run_deployment_through_a_worker()
    assert run.state.is_completed(), (run.state, log[-3000:])
    assert (workspace / "metrics" / "register.json").is_file()

    # A stage that breaks fails the flow run, and the state says which stage.
    stage_script = workspace / "stages" / "model_card.py"
    script = stage_script.read_text()
    future = "from __future__ import annotations\n"
    stage_script.write_text(
        script.replace(future, f'{future}raise SystemExit("error: deliberately broken by the test")\n')
    )
    try:
        run, log = run_deployment_through_a_worker()
    finally:
        stage_script.write_text(script)
    assert run.state.is_failed(), (run.state, log[-3000:])
    assert "stage 'model_card' failed" in run.state.message and "deliberately broken" in run.state.message


def test_a_study_reopened_after_a_kill_fails_the_trial_left_running(tmp_path):
    import optuna

    from tisslm.core.config import HpoParams
    from tisslm.flows.hpo import open_study

    hpo = HpoParams(storage="hpo/study.journal")
    study = open_study(tmp_path, hpo)
    study.tell(study.ask(), 1.5)
    study.ask()  # a process killed here leaves this trial RUNNING in the journal
    reopened = open_study(tmp_path, hpo)
    assert [t.state for t in reopened.get_trials()] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]


def test_the_flow_log_leaves_out_dvcs_git_hints_and_nothing_else(tmp_path):
    """DVC's advice to `git add dvc.lock` after every stage filled the flow's log fifteen times; the
    summary says it once. Checked on what this DVC prints, so that a change of its wording shows."""
    from tisslm.flows.pipeline import DVC_GIT_HINT

    (tmp_path / "dvc.yaml").write_text("stages:\n  make:\n    cmd: echo made > out.txt\n    outs:\n      - out.txt\n")
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        assert run(command, tmp_path).returncode == 0
    repro = run([sys.executable, "-m", "dvc", "repro", "--single-item", "make"], tmp_path)
    assert repro.returncode == 0, repro.stderr
    lines = [line.strip() for line in (repro.stdout + repro.stderr).splitlines() if line.strip()]
    hidden = [line for line in lines if DVC_GIT_HINT.match(line)]
    git_add = hidden.pop(1).split()  # DVC names the files in no fixed order
    assert git_add[:2] == ["git", "add"] and sorted(git_add[2:]) == [".gitignore", "dvc.lock"]
    assert hidden == [
        "To track the changes with git, run:",
        "To enable auto staging, run:",
        "dvc config core.autostage true",
        "Use `dvc push` to send your updates to remote storage.",
    ]
    assert [line for line in lines if not DVC_GIT_HINT.match(line)] == [
        "Running stage 'make':",
        "> echo made > out.txt",
        "Generating lock file 'dvc.lock'",
        "Updating lock file 'dvc.lock'",
    ]

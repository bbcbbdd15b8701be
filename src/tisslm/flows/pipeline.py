"""Prefect flows over the DVC stages: the whole pipeline, and retraining (pull, pipeline, push).

Each stage runs as `dvc repro --single-item <stage>`, not as its Python function, so that DVC stays
the one judge of what is stale and the one writer of dvc.lock and the cache: `dvc repro` alone and
these flows make the same artifacts. The order comes from DVC's own graph of dvc.yaml, and stages run
one at a time because DVC locks the repository while a stage runs.

MLflow: the flow opens a parent run, and for each stage a child run whose id it hands to the stage
in TISSLM_MLFLOW_RUN_ID; stages that log (train, register) log into it, and the flow adds what every
stage has: its params, the numbers in its metrics files, its output hashes from dvc.lock, its log
and its wall time.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from mlflow import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tisslm.core.config import Params, load_params
from tisslm.core.errors import ConfigError, TissLMError
from tisslm.release.registry import verdict
from tisslm.tracking import RUN_ENV, flatten, log_numbers, log_params, open_run, tracking_uri

PARAMS_FILE = "params.yaml"
# DVC's advice after each stage on versioning dvc.lock: said once, in the run's summary, instead of
# fifteen times in the flow's log (the stage's MLflow log keeps it).
DVC_GIT_HINT = re.compile(
    r"To track the changes with git, run:|git add .*dvc\.lock|To enable auto staging, run:|dvc config core\.autostage"
    r"|Use `dvc push`"
)
# Failures worth another attempt: DVC's repository lock held by another process, a stage killed by a
# signal (OOM killer, preemption), SQLite busy under concurrent MLflow writers.
TRANSIENT = re.compile(r"Unable to acquire lock|exited with -\d+|exited with 13[07]|database is locked")


class StageFailed(TissLMError):
    """A stage exited non-zero or ran out of time; the message names it and quotes its last lines."""

    exit_code = 1

    def __init__(self, stage: str, reason: str, tail: list[str], transient: bool):
        # The stage's own one-line error says most; DVC's closing "failed to reproduce" line says least.
        errors = [line for line in tail if line.startswith("error: ")]
        last = errors[-1] if errors else next((line for line in reversed(tail) if line.strip()), "")
        super().__init__(f"stage '{stage}' failed: {reason}" + (f": {last.strip()}" if last else ""))
        self.stage, self.tail, self.transient = stage, tail, transient


@dataclass
class StageOutcome:
    stage: str
    ran: bool  # False: DVC found the stage up to date and reused its outputs
    seconds: float
    mlflow_run_id: str


@dataclass
class PipelineOutcome:
    decision: dict  # metrics/register.json: promoted, reasons, challenger and champion versions
    stages: list[StageOutcome]
    mlflow_run_id: str  # the parent run
    seconds: float


def project_root() -> Path:
    """The DVC project the flows act on: the working directory (a deployment sets it)."""
    root = Path.cwd()
    if not (root / "dvc.yaml").is_file():
        raise TissLMError(f"{root}: no dvc.yaml here; run the pipeline from the project's root directory")
    return root


def stage_order(root: Path, target: str | None = None) -> list[str]:
    """dvc.yaml's stages in an order DVC's graph allows (ties kept in file order); with `target`,
    only the stages it depends on, itself last."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        position = {stage: i for i, stage in enumerate(repo.index.stages)}
        stages = [s for s in graph if isinstance(s, PipelineStage)]
        if target is not None:
            chosen = next((s for s in stages if s.addressing == target), None)
            if chosen is None:
                raise TissLMError(f"dvc.yaml: no stage named {target!r}")
            stages = [chosen, *nx.descendants(graph, chosen)]
        ordered = nx.lexicographical_topological_sort(graph.subgraph(stages).reverse(), key=lambda s: position[s])
        return [s.addressing for s in ordered]


def _stage_declarations(root: Path, stage: str) -> tuple[list[str], list[str]]:
    """The params keys and metrics files dvc.yaml declares for `stage`."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        (found,) = [s for s in repo.index.stages if s.addressing == stage]
        params = [k for d in found.deps if isinstance(d, ParamsDependency) for k in (d.params or [])]
        metrics = [out.def_path for out in found.outs if out.metric]
    return params, metrics


def stage_arguments(root: Path, stage: str) -> dict[str, Path]:
    """The `--name PATH` arguments of a stage's command in dvc.yaml, as {name: root / PATH}: the
    paths a flow needs are read from where the stage gets them, not written a second time."""
    command = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    words = shlex.split(command)
    return {
        flag.removeprefix("--").replace("-", "_"): root / value
        for flag, value in itertools.pairwise(words)
        if flag.startswith("--")
    }


def apply_overrides(root: Path, overrides: list[str]) -> None:
    """Write `key=value` overrides into params.yaml as `dvc exp run -S` does (Hydra override
    grammar; comments kept), after checking them against the params schema. params.yaml stays the
    one record of what ran: dvc.lock and MLflow both read it from there."""
    if not overrides:
        return
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    load_params(root / PARAMS_FILE, [o.lstrip("+") for o in overrides])  # one-line errors before any write
    with tempfile.TemporaryDirectory(dir=root) as scratch:  # edit a copy, then swap it in whole
        copy = Path(scratch) / PARAMS_FILE
        shutil.copy2(root / PARAMS_FILE, copy)
        try:
            dvc_apply_overrides(copy, list(overrides))
        except Exception as err:  # Hydra's grammar errors come as several exception types
            raise ConfigError(f"--set {' '.join(overrides)}: {err}") from None
        os.replace(copy, root / PARAMS_FILE)


def _git_commit(root: Path) -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def _numbers(values: dict) -> dict[str, float]:
    """Numeric leaves of a metrics file, under keys MLflow accepts."""
    return {
        re.sub(r"[^\w\-. /]", "_", key): float(value)
        for key, value in flatten(values).items()
        if isinstance(value, (int, float))
    }


def _stage_environment() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # dvc.yaml says `python`: it must be this environment's
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": tracking_uri(),  # absolute: stages log to the flow's store
        "PYTHONUNBUFFERED": "1",
        "TQDM_MININTERVAL": "10",  # progress bars become log lines: fewer of them
    }


def _without_dvc_git_hints(logger):
    """The flow log's writer: every line of a stage but DVC's DVC_GIT_HINT."""

    def log(line: str) -> None:
        if not DVC_GIT_HINT.match(line.strip()):
            logger.info(line)

    return log


def _stream(command: list[str], root: Path, env: dict[str, str], timeout_s: float, log) -> tuple[int | None, list[str]]:
    """Run `command`, passing each output line to `log`; returns (exit code or None on timeout, all lines)."""
    process = subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        start_new_session=True,  # so a timeout can kill the stage's whole process tree (torchrun's workers)
    )  # fmt: skip
    lines: list[str] = []

    def pump() -> None:
        for line in process.stdout:  # universal newlines: tqdm's \r updates arrive as lines too
            if line.strip():
                lines.append(line.rstrip())
                log(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        code = None
    reader.join(timeout=10)
    return code, lines


def _is_transient(task, task_run, state) -> bool:
    error = state.result(raise_on_failure=False)
    return isinstance(error, StageFailed) and error.transient


@task(name="dvc-stage", task_run_name="{stage}", retry_condition_fn=_is_transient)
def run_stage(stage: str, root: Path, parent_run_id: str, timeout_s: float) -> StageOutcome:
    """`dvc repro --single-item <stage>` with its log streamed here and an MLflow child run of its own."""
    logger = get_run_logger()
    run_id = open_run(stage, parent_run_id, {"dvc.stage": stage})
    client = MlflowClient()
    env = _stage_environment() | {RUN_ENV: run_id}
    started = time.perf_counter()
    repro = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    code, lines = _stream(repro, root, env, timeout_s, _without_dvc_git_hints(logger))
    seconds = time.perf_counter() - started
    client.log_text(run_id, "\n".join(lines) + "\n", "stage.log")
    client.log_metric(run_id, "stage_seconds", seconds)
    if code != 0:
        client.set_terminated(run_id, "FAILED")
        reason = f"timed out after {timeout_s:.0f} s" if code is None else f"dvc repro exited with {code}"
        tail = lines[-20:]
        raise StageFailed(stage, reason, tail, transient=code is None or bool(TRANSIENT.search("\n".join(tail))))

    ran = not any("didn't change, skipping" in line for line in lines)
    params_keys, metrics_files = _stage_declarations(root, stage)
    declared = load_params(root / PARAMS_FILE).model_dump(by_alias=True)
    log_params(
        run_id,
        {k: v for k, v in flatten(declared).items() if any(k == p or k.startswith(f"{p}.") for p in params_keys)},
    )
    for path in metrics_files:
        if (root / path).is_file():
            log_numbers(run_id, _numbers(yaml.safe_load((root / path).read_text())))  # JSON is YAML
    locked = yaml.safe_load((root / "dvc.lock").read_text())["stages"].get(stage, {})
    for out in locked.get("outs", []):  # lineage: which bytes this run made, as DVC addresses them
        client.set_tag(run_id, f"dvc.out.{out['path']}", out.get("md5", ""))
    client.set_tag(run_id, "dvc.ran", str(ran).lower())
    client.set_terminated(run_id, "FINISHED")
    logger.info(f"stage {stage}: {'ran' if ran else 'up to date'} in {seconds:.1f} s")
    return StageOutcome(stage, ran, seconds, run_id)


def run_stages(stages: list[str], root: Path, parent_run_id: str, params: Params) -> list[StageOutcome]:
    configured = run_stage.with_options(
        retries=params.pipeline.retries, retry_delay_seconds=params.pipeline.retry_delay_s
    )
    return [configured(stage, root, parent_run_id, params.pipeline.stage_timeout_s) for stage in stages]


@contextlib.contextmanager
def parent_run(name: str, root: Path, params: Params, tags: dict[str, str]):
    """An MLflow run for a whole flow, ended FAILED (naming the failed stage) if the flow raises."""
    from prefect.runtime import flow_run

    all_tags = {"git.commit": _git_commit(root), "prefect.flow_run_id": str(flow_run.id)} | tags
    run_id = open_run(name, tags=all_tags)
    client = MlflowClient()
    log_params(run_id, params.model_dump(by_alias=True))
    try:
        yield client, run_id
    except BaseException as err:
        if isinstance(err, StageFailed):
            client.set_tag(run_id, "failed_stage", err.stage)
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


@flow(name="tisslm-pipeline", log_prints=True)
def tisslm_pipeline(overrides: list[str] | None = None) -> PipelineOutcome:
    """Every dvc.yaml stage in order; returns the registry's decision on the model it made."""
    started = time.perf_counter()
    root = project_root()
    apply_overrides(root, list(overrides or []))
    params = load_params(root / PARAMS_FILE)
    stages = stage_order(root)
    with parent_run("pipeline", root, params, {"overrides": " ".join(overrides or [])}) as (client, run_id):
        outcomes = run_stages(stages, root, run_id, params)
        decision = yaml.safe_load((root / _stage_declarations(root, "register")[1][0]).read_text())
        client.log_metric(run_id, "promoted", float(decision["promoted"]))
        client.log_metric(run_id, "challenger_bits_per_byte", decision["challenger_bits_per_byte"])
        client.log_metric(run_id, "challenger_humaneval_pass_at_1", decision["challenger_pass_at_1"])
        client.set_tag(run_id, "registry.decision", "; ".join(decision["reasons"]))
        client.log_artifact(run_id, str(root / "dvc.lock"))
        client.log_artifact(run_id, str(root / PARAMS_FILE))
    outcome = PipelineOutcome(decision, outcomes, run_id, time.perf_counter() - started)
    _publish(outcome)
    return outcome


def _publish(outcome: PipelineOutcome) -> None:
    """Prefect artifacts: the stage timings as a table, the registry decision as a note."""
    create_table_artifact(
        key="tisslm-stages",
        table=[asdict(s) | {"seconds": round(s.seconds, 1)} for s in outcome.stages],
        description="Stages of the last pipeline run: ran or reused, wall time, MLflow run",
    )
    create_markdown_artifact(
        key="tisslm-registry-decision",
        markdown=f"**tisslm version {outcome.decision['challenger_version']}: {verdict(outcome.decision)}**\n\n"
        + "\n".join(f"- {reason}" for reason in outcome.decision["reasons"]),
        description="The promotion gate's decision on the model this run made",
    )


def _dvc(root: Path, *args: str) -> None:
    logger = get_run_logger()
    code, lines = _stream([sys.executable, "-m", "dvc", *args], root, _stage_environment(), 3600, logger.info)
    if code != 0:
        raise TissLMError(f"dvc {' '.join(args)} failed: {lines[-1] if lines else f'exit {code}'}")


def _has_remote(root: Path) -> bool:
    result = subprocess.run([sys.executable, "-m", "dvc", "remote", "list"], cwd=root, capture_output=True, text=True)
    return result.returncode == 0 and bool(result.stdout.strip())


@flow(name="tisslm-retrain", log_prints=True)
def tisslm_retrain(overrides: list[str] | None = None) -> PipelineOutcome:
    """What CI and the nightly deployment run: fetch the data and models others pushed, rerun what
    changed, share the results, and leave the registry's decision."""
    root = project_root()
    remote = _has_remote(root)
    if remote:
        _dvc(root, "pull", "--allow-missing")  # a fresh remote lacks outputs nobody pushed yet
    else:
        get_run_logger().warning("no DVC remote configured: nothing to pull or push")
    outcome = tisslm_pipeline(overrides)
    if remote:
        _dvc(root, "push")
    return outcome

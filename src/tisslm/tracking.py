"""MLflow tracking for the stages that log (train, register) and the flows that run them.

The tracking URI is MLFLOW_TRACKING_URI when set, else a sqlite file at the repository root
given as an absolute URI, so that runs started from any directory land in the same store.
A flow that orchestrates stages opens one run per stage, nested under its own, and hands the
stage its run id in TISSLM_MLFLOW_RUN_ID: the stage logs into that run instead of opening a new
one, so each stage has exactly one run in the pipeline's tree. A resumed training run continues
its MLflow run (the id travels in the checkpoint).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from tisslm.core.config import Params

EXPERIMENT = "tisslm"
RUN_ENV = "TISSLM_MLFLOW_RUN_ID"  # the run a flow opened for this stage to log into
# The environment of the MLflow servers the project starts (`tisslm ui`; infra/docker-compose.yml says the
# same). MLflow 3 starts six job-runner processes (huey consumers) with every server by default, for GenAI
# jobs the project never submits: they cost seconds of start-up and poll the store while it runs.
SERVER_ENVIRONMENT = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store live beside the database, not wherever the process started."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None  # a tracking server decides for itself


def use_experiment(name: str):
    """Point MLflow (tracking and registry) at the project's store and select `name`, creating it
    with its artifacts beside a sqlite store. Returns the mlflow module, ready to log."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=artifact_location(uri))
    mlflow.set_experiment(name)
    return mlflow


def flatten(values: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested params or metrics as MLflow keys."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def open_run(name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    """A new run in the project's experiment, left open for other processes (stages, trials) to log
    into; made through the client, so this process holds no active run."""
    mlflow = use_experiment(EXPERIMENT)
    experiment_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    nesting = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
    return mlflow.MlflowClient().create_run(experiment_id, run_name=name, tags=(tags or {}) | nesting).info.run_id


def log_params(run_id: str, params: dict) -> None:
    """Log nested params as strings, skipping keys the run already has (MLflow refuses to change one)."""
    import mlflow

    client = mlflow.MlflowClient()
    logged = client.get_run(run_id).data.params
    fresh = [mlflow.entities.Param(k, str(v)) for k, v in flatten(params).items() if k not in logged]
    for batch in _batches(fresh, 100):  # MLflow's limit per request
        client.log_batch(run_id, params=batch)


def log_numbers(run_id: str, values: dict[str, float]) -> None:
    """Log many metrics at once, at step 0."""
    import mlflow

    now = int(time.time() * 1000)
    metrics = [mlflow.entities.Metric(k, v, now, 0) for k, v in values.items()]
    for batch in _batches(metrics, 1000):  # MLflow's limit per request
        mlflow.MlflowClient().log_batch(run_id, metrics=batch)


@contextlib.contextmanager
def stage_run(name: str, experiment: str = EXPERIMENT):
    """The run a stage logs into: the one its flow opened (TISSLM_MLFLOW_RUN_ID), else a new one."""
    mlflow = use_experiment(experiment)
    run_id = os.environ.get(RUN_ENV)
    if run_id:  # MLflow resumes a run only inside the run's own experiment
        mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else name) as run:
        yield run


class Tracker:
    def __init__(self, run_id: str):
        self.run_id = run_id

    @classmethod
    def start(cls, params: Params, run_id: str | None = None) -> Tracker:
        """Log into `run_id` (a flow's run for this stage, or the run a checkpoint resumes), else a new run."""
        mlflow = use_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT))
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else "train", log_system_metrics=True)
        log_params(run.info.run_id, {"model": params.model.model_dump(), "train": params.train.model_dump()})
        return cls(run.info.run_id)

    def fail(self) -> None:
        import mlflow

        mlflow.end_run(status="FAILED")

    def log_step(self, record: dict) -> None:
        import mlflow

        mlflow.log_metrics({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])

    def finish(self, metrics: dict, history: list[dict], model_dir: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import mlflow

        final = {
            f"final_{k}": float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        mlflow.log_metrics(final)
        figure, axis = plt.subplots(figsize=(7, 4))
        train = [(h["step"], h["train_loss"]) for h in history if "tokens_per_s" in h]
        val = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
        for points, label in ((train, "train"), (val, "val")):
            if points:
                axis.plot(*zip(*points, strict=True), label=label, marker="o" if label == "val" else None)
        axis.set(xlabel="step", ylabel="loss (nats/token)", title="TissLM training loss")
        axis.legend()
        mlflow.log_figure(figure, "train_loss.png")
        plt.close(figure)
        mlflow.log_artifact(str(model_dir / "training.json"))
        mlflow.end_run()

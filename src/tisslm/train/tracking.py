"""MLflow tracking for training runs (rank 0 only).

The tracking URI is MLFLOW_TRACKING_URI when set, else a sqlite file at the repository root
given as an absolute URI, so that runs started from any directory land in the same store.
A resumed run continues its MLflow run (the id travels in the checkpoint).
"""

from __future__ import annotations

import os
from pathlib import Path

from tisslm.config import Params

EXPERIMENT = "tisslm"
PARENT_RUN_ENV = "TISSLM_PARENT_RUN_ID"  # set by the pipeline flow so stage runs nest under it


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


def _flatten(prefix: str, values: dict) -> dict[str, str]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flatten(f"{prefix}{key}.", value)
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


class Tracker:
    def __init__(self, run_id: str):
        self.run_id = run_id

    @classmethod
    def start(cls, params: Params, run_id: str | None = None) -> Tracker:
        mlflow = use_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT))
        parent = os.environ.get(PARENT_RUN_ENV)
        run = mlflow.start_run(
            run_id=run_id,
            run_name=None if run_id else "train",
            parent_run_id=None if run_id else parent,
            log_system_metrics=True,
        )
        if run_id is None:  # a resumed run already has its parameters
            mlflow.log_params(
                _flatten("model.", params.model.model_dump()) | _flatten("train.", params.train.model_dump())
            )
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

"""Where the served model comes from: a directory, or a version in the MLflow model registry."""

from __future__ import annotations

from pathlib import Path

from tisslm.errors import TissLMError
from tisslm.model import CONFIG_FILE

REGISTRY_SCHEME = "models:/"


def resolve_model_dir(spec: str) -> Path:
    """The model directory `spec` names: a path, or `models:/NAME@ALIAS` / `models:/NAME/VERSION`,
    downloaded from the registry `tisslm register` writes to (MLFLOW_TRACKING_URI, else ./mlflow.db)."""
    if not spec.startswith(REGISTRY_SCHEME):
        directory = Path(spec)
        if not (directory / CONFIG_FILE).is_file():
            raise TissLMError(f"{directory}: not a model directory (no {CONFIG_FILE})")
        return directory
    from tisslm.registry import REGISTRY_EXPERIMENT
    from tisslm.train.tracking import use_experiment

    mlflow = use_experiment(REGISTRY_EXPERIMENT)
    try:
        downloaded = Path(mlflow.artifacts.download_artifacts(spec))
    except Exception as err:  # MlflowException and the store's own errors: a name, alias or store that is not there
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TissLMError(f"{spec}: cannot download from the registry ({first_line})") from None
    # The pyfunc model keeps the logged directory under artifacts/, by its original name.
    found = next(downloaded.glob(f"artifacts/*/{CONFIG_FILE}"), None)
    if found is None:
        raise TissLMError(f"{spec}: the registered model holds no TissLM model directory")
    return found.parent

"""Where the served model comes from: a directory, or a version in the MLflow model registry."""

from __future__ import annotations

from pathlib import Path

from tisslm.core.errors import TissLMError
from tisslm.core.model import CONFIG_FILE

REGISTRY_SCHEME = "models:/"


def resolve_model_dir(spec: str) -> Path:
    """The model directory `spec` names: a path, or `models:/NAME@ALIAS` / `models:/NAME/VERSION`,
    downloaded from the registry `tisslm register` writes to (MLFLOW_TRACKING_URI, else ./mlflow.db)."""
    if not spec.startswith(REGISTRY_SCHEME):
        directory = Path(spec)
        if not (directory / CONFIG_FILE).is_file():
            raise TissLMError(f"{directory}: not a model directory (no {CONFIG_FILE})")
        return directory
    from tisslm.release.registry import registered_model_dir

    return registered_model_dir(spec)

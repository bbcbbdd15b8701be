"""Checkpoints in the manner of torchtitan: `step-N/` directories, complete or ignored.

A checkpoint holds the model (save_pretrained), the optimizer state, every rank's RNG state and
the trainer state (step, history, MLflow run id) - all tensors in safetensors, the rest JSON,
nothing pickled. It is written to a temporary directory, marked COMPLETE last, and renamed into
place, so a crash at any moment leaves either the whole checkpoint or one that resume skips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tisslm.core.model import CONFIG_FILE, WEIGHTS_FILE, ModelConfig, TissLM

COMPLETE = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict  # trainer_state.json
    rng: dict[str, torch.Tensor]  # "rank{r}.cpu" / "rank{r}.cuda" -> RNG state


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], layout: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *layout["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": layout["param_groups"]}


def save_checkpoint(
    directory: Path,
    step: int,
    model: TissLM,
    optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor],
    state: dict,
    keep: int,
) -> Path:
    """Write step-N (state must carry the run's "fingerprint") and prune: the newest `keep` of
    this run stay, checkpoints of other configurations go (this run can never resume them)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step}"
    tmp = directory / f".step-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tensors, layout = _flatten_optimizer(optimizer)
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "optimizer.json").write_text(json.dumps(layout))
    save_file({k: v.contiguous() for k, v in rng.items()}, tmp / "rng.safetensors")
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    with open(tmp / COMPLETE, "w") as f:  # last, and flushed to disk before the rename
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # an unmarked leftover from a crash at this very step
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(directory, keep, state["fingerprint"])
    return final


def _complete_steps(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for path in directory.iterdir() if directory.is_dir() else []:
        match = STEP_DIR.match(path.name)
        if match and (path / COMPLETE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def _fingerprint(path: Path) -> str | None:
    try:
        return json.loads((path / "trainer_state.json").read_text()).get("fingerprint")
    except (OSError, json.JSONDecodeError):
        return None


def _prune(directory: Path, keep: int, fingerprint: str) -> None:
    ours = [path for _, path in _complete_steps(directory) if _fingerprint(path) == fingerprint]
    others = [path for _, path in _complete_steps(directory) if _fingerprint(path) != fingerprint]
    for path in ours[keep:] + others:
        shutil.rmtree(path, ignore_errors=True)


def load_latest(
    directory: Path, model: TissLM, optimizer: torch.optim.Optimizer, fingerprint: str
) -> Checkpoint | None:
    """Restore the newest checkpoint of this run configuration that is complete and readable.

    Unmarked directories are never considered; a marked one that fails to load (truncated,
    corrupted) or comes from another configuration is skipped with a warning.
    """
    for step, path in _complete_steps(directory):
        if _fingerprint(path) != fingerprint:
            warnings.warn(f"{path}: skipped, written by another configuration of model/train params", stacklevel=2)
            continue
        try:
            # The file's tensors into the run's model as they are: with LoRA, its base and adapters.
            config = ModelConfig.model_validate_json((path / CONFIG_FILE).read_text())
            weights = load_file(path / WEIGHTS_FILE, device=str(next(model.parameters()).device))
            if config.tie_embeddings:
                weights["lm_head.weight"] = weights["tok_emb.weight"]
            optimizer_state = _unflatten_optimizer(
                load_file(path / "optimizer.safetensors"), json.loads((path / "optimizer.json").read_text())
            )
            rng = load_file(path / "rng.safetensors")
            state = json.loads((path / "trainer_state.json").read_text())
            if config != model.config:
                raise ValueError("model config differs from the run's")
            model.load_state_dict(weights)
            optimizer.load_state_dict(optimizer_state)
        except Exception as err:
            warnings.warn(f"{path}: skipped, not loadable ({type(err).__name__}: {err})", stacklevel=2)
            continue
        return Checkpoint(path, step, state, rng)
    return None

"""The schema of params.yaml: one pydantic model per section, and `load_params`.

params.yaml holds every knob; this module says what each may be. Stages, the CLI and the flows
read parameters only through `load_params`, so a bad value is caught in one place with one
message (`params.yaml: model.n_heads=0: Input should be greater than 0`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt

from tisslm.errors import ConfigError, parse
from tisslm.model import ModelConfig

DEFAULT_PARAMS = Path("params.yaml")


class GenerateParams(BaseModel):
    """Defaults for `tisslm generate` and the samples stages print."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: NonNegativeInt = 128  # tokens to add after the prompt
    temperature: float = Field(0.8, ge=0)  # softmax temperature; 0 is greedy
    top_k: PositiveInt | None = 50  # sample among the k most likely tokens (None: all)
    top_p: float | None = Field(0.95, gt=0, le=1)  # nucleus mass (None or 1: no nucleus cut)
    seed: int | None = None  # fixes the sampled tokens; None draws fresh randomness


class Params(BaseModel):
    """All of params.yaml."""

    model_config = ConfigDict(extra="forbid")

    model: ModelConfig = ModelConfig()
    generate: GenerateParams = GenerateParams()


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw_value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected key.path=value, e.g. model.d_model=512")
    try:
        value = yaml.safe_load(raw_value) if raw_value else None
    except yaml.YAMLError:
        value = raw_value  # not YAML: take it as the string it is
    *parents, leaf = key.split(".")
    node = data
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parents[: depth + 1])
            raise ConfigError(f"override {override!r}: {where} is a value, not a section")
        node = child
    node[leaf] = value


def load_params(path: str | Path | None = DEFAULT_PARAMS, overrides: Sequence[str] = ()) -> Params:
    """Read and validate params.yaml (None: the defaults), after applying `key.sub=value` overrides."""
    data: Any = {}
    source = "defaults" if path is None else str(path)
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: unreadable ({err})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}: invalid YAML{where}: {getattr(err, 'problem', err)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    for override in overrides:
        _apply_override(data, override)
    return parse(Params, data, source)

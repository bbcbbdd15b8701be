"""Errors a user can fix, and the one-line messages they get.

Every entry point (CLI, stages) catches `TissLMError`, prints its message on one line and exits
with status 2: a user who passes a bad value wants to know which key, which value and what is
allowed, not a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # pydantic loads with the params schema, not with every command that may raise
    from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound="BaseModel")


class TissLMError(Exception):
    """A problem with the user's input (params, files, arguments), reported in one line."""

    exit_code = 2


class ConfigError(TissLMError):
    """Invalid parameters: names the source, the key path, the bad value and what is allowed."""


class ValidationFailed(TissLMError):
    """An output failed its check (a data suite, an export's parity): the stage stops, exit 1."""

    exit_code = 1


def run_main(main: Callable[[], object]) -> None:
    """Run an entry point (CLI, stage); a TissLMError becomes one line on stderr and its exit code.
    Import-time noise of libraries it may load is dropped first (tisslm.core.logs), and pydantic's
    plugins are not looked for: finding them reads the entry points of every installed package,
    30 ms of each command's start-up, and TissLM uses none (a user's own setting wins)."""
    from tisslm.core.logs import quiet_library_logs

    quiet_library_logs()
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    try:
        main()
    except TissLMError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None


def _describe(error: dict[str, Any], prefix: str) -> str:
    path = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{path}: required but missing"
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    if isinstance(error["input"], dict) and error["type"] == "value_error":  # a check across fields names them
        return f"{path}: {message}"
    return f"{path}={error['input']!r}: {message}"


def validation_message(err: ValidationError, source: str, prefix: str = "") -> str:
    """Fold a pydantic ValidationError into one line: `source: key.path=value: what is allowed`."""
    return f"{source}: " + "; ".join(_describe(e, prefix) for e in err.errors())


def parse(model: type[M], data: Any, source: str, prefix: str = "") -> M:
    """Validate `data` as `model`, raising ConfigError with a one-line message on failure."""
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(validation_message(err, source, prefix)) from None

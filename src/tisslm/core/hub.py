"""Whether a Hugging Face hub dataset can be had right now, answered fast and in one line."""

from __future__ import annotations

import socket
from pathlib import Path

from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
from huggingface_hub import constants as hub_constants

from tisslm.core.errors import TissLMError


def require_hub(name: str, where: str, timeout: float = 3.0) -> None:
    """Raise TissLMError at once when `name` is a hub id and the hub cannot be reached (rather
    than after `datasets`' half a minute of retries); local data needs no network and passes.
    `where` names the params key that asked for it."""
    if Path(name).exists() or name in _PACKAGED_DATASETS_MODULES:
        return
    if hub_constants.HF_HUB_OFFLINE:
        raise TissLMError(f"{where}: hf {name!r}: HF_HUB_OFFLINE is set and {name!r} is not local")
    host = hub_constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=timeout).close()
    except OSError as err:
        raise TissLMError(f"{where}: hf {name!r}: the hub ({host}) is unreachable ({err})") from None

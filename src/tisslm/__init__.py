"""TissLM: a small modern decoder-only language model and the pipeline that makes it.

The public API is re-exported here; the modules live in layers (see docs/architecture.md).
Names load on first use (PEP 562), so `import tisslm.cli` or reading params does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tisslm.core.config import ModelConfig, load_params
    from tisslm.core.generate import generate
    from tisslm.core.model import TissLM

__version__ = "0.1.0"
__all__ = ["ModelConfig", "TissLM", "generate", "load_params"]

_HOMES = {
    "ModelConfig": "tisslm.core.config",
    "TissLM": "tisslm.core.model",
    "generate": "tisslm.core.generate",
    "load_params": "tisslm.core.config",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'tisslm' has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])

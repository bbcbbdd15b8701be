"""TissLM: a small modern decoder-only language model and the pipeline that makes it.

The public API is re-exported here; the modules live in layers (see docs/architecture.md).
Names load on first use (PEP 562), so `import tisslm.cli` or reading params does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tisslm.core.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _HOMES)

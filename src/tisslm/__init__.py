"""TissLM: a small modern decoder-only language model and the pipeline that makes it.

The public API is re-exported here; the modules live in layers (see docs/architecture.md).
"""

from tisslm.core.config import load_params
from tisslm.core.generate import generate
from tisslm.core.model import ModelConfig, TissLM

__version__ = "0.1.0"
__all__ = ["ModelConfig", "TissLM", "generate", "load_params"]

"""The knowledge base: chunks of code and docs indexed for retrieval-augmented generation.

build_index(out, directory=..., clean=..., files=...)  create or update an index directory
KnowledgeBase.open(dir).search(query, k, mode)          fused BM25 + dense retrieval -> [Hit]
tisslm.kb.context.with_context(prompt, hits, ...)       retrieved chunks placed before a prompt
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tisslm.kb.build import build_index
    from tisslm.kb.index import Hit, KnowledgeBase

__all__ = ["Hit", "KnowledgeBase", "build_index"]

# Loaded on first use (PEP 562): searching needs the index, not the build's anonymiser and chunker.
_HOMES = {"Hit": "tisslm.kb.index", "KnowledgeBase": "tisslm.kb.index", "build_index": "tisslm.kb.build"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'tisslm.kb' has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value
    return value

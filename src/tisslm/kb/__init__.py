"""The knowledge base: chunks of code and docs indexed for retrieval-augmented generation.

build_index(out, directory=..., clean=..., files=...)  create or update an index directory
KnowledgeBase.open(dir).search(query, k, mode)          fused BM25 + dense retrieval -> [Hit]
tisslm.kb.context.with_context(prompt, hits, ...)       retrieved chunks placed before a prompt
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tisslm.core.lazy import lazy_exports

if TYPE_CHECKING:
    from tisslm.kb.build import build_index
    from tisslm.kb.index import Hit, KnowledgeBase

__all__ = ["Hit", "KnowledgeBase", "build_index"]

# Loaded on first use (PEP 562): searching needs the index, not the build's anonymiser and chunker.
_HOMES = {"Hit": "tisslm.kb.index", "KnowledgeBase": "tisslm.kb.index", "build_index": "tisslm.kb.build"}


__getattr__, __dir__ = lazy_exports(__name__, _HOMES)

"""The knowledge base: chunks of code and docs indexed for retrieval-augmented generation.

build_index(out, directory=..., clean=..., files=...)  create or update an index directory
KnowledgeBase.open(dir).search(query, k, mode)          fused BM25 + dense retrieval -> [Hit]
tisslm.kb.context.with_context(prompt, hits, ...)       retrieved chunks placed before a prompt
"""

from tisslm.kb.build import build_index
from tisslm.kb.index import Hit, KnowledgeBase

__all__ = ["Hit", "KnowledgeBase", "build_index"]

"""Closed sets of names that the params schema, the CLI's help and the code acting on them share.

It imports only `typing`: the CLI builds its help from these without loading pydantic and the
params schema, which cost every command about 0.1 s of start-up.
"""

from __future__ import annotations

from typing import Literal, get_args

SearchMode = Literal["fused", "bm25", "dense"]  # how a knowledge base ranks (`KnowledgeBase.search`)
SEARCH_MODES: tuple[str, ...] = get_args(SearchMode)

"""Dense embeddings that need no download: WordLlama's 256-d weights ship inside its wheel.

WordLlama is a bag of token embeddings distilled from an LLM's input layer and average-pooled:
far weaker than a transformer encoder, but it loads in a fraction of a second, embeds thousands of
chunks per second on a CPU and runs offline, which is what an index rebuilt by `dvc repro` needs.
The model's name is stored in the index, so vectors from different models are never compared.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from tisslm.core.errors import TissLMError

WORDLLAMA_CONFIG = "l2_supercat"
DIM = 256
# Characters of a chunk that are embedded: WordLlama averages token vectors, so past a few
# thousand characters more text only blurs the mean (and costs time on 700 KB data tables).
EMBED_CHARS = 4000


@cache
def _wordllama():
    try:
        import wordllama
        from wordllama import WordLlama

        model = WordLlama.load(
            config=WORDLLAMA_CONFIG, cache_dir=Path(wordllama.__file__).parent, dim=DIM, disable_download=True
        )
    except Exception as err:  # ImportError, missing weights, a changed wheel layout
        raise TissLMError(f"cannot load the WordLlama embedding model offline ({type(err).__name__}: {err})") from None
    return model


def model_name() -> str:
    """The embedding model's name and version, as stored in an index's metadata (loads nothing)."""
    try:
        return f"wordllama-{version('wordllama')}/{WORDLLAMA_CONFIG}_{DIM}"
    except PackageNotFoundError:
        raise TissLMError("the wordllama package is not installed (pip install wordllama)") from None


def embed(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-length float32 vectors, shape (len(texts), DIM): cosine similarity is a dot product.

    WordLlama pads each batch to its longest text, so texts go in sorted by length (3x faster on
    code chunks, whose lengths vary a hundredfold) and come back in the caller's order.
    """
    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    vectors = _wordllama().embed([texts[i][:EMBED_CHARS] for i in order], norm=True, batch_size=batch_size)
    out = np.empty((len(texts), DIM), dtype=np.float32)
    out[order] = np.asarray(vectors, dtype=np.float32).reshape(len(texts), DIM)
    return out

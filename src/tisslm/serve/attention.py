"""Attention maps of a short text: the weights of every layer and head, as JSON or as a PNG.

The web page's attention view and `tisslm attention` show the same maps, computed by
`attention_maps`: the model's forward again, with an explicit softmax, since SDPA never
materialises its weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from tisslm.core.errors import TissLMError
from tisslm.core.model import TissLM

VISIBLE_WHITESPACE = str.maketrans({" ": "␣", "\n": "↵", "\t": "⇥"})


@dataclass
class AttentionMaps:
    tokens: list[str]  # each token's own text, whitespace made visible
    weights: torch.Tensor  # (n_layers, n_heads, T, T): row = query position, column = key position

    def to_json(self, decimals: int = 4) -> dict:
        n_layers, n_heads, _, _ = self.weights.shape
        rounded = (self.weights.double() * 10**decimals).round() / 10**decimals  # double: 0.4974, not 0.49739998
        return {"tokens": self.tokens, "n_layers": n_layers, "n_heads": n_heads, "weights": rounded.tolist()}


@torch.no_grad()  # not inference_mode: callers may go on computing with the maps
def attention_maps(model: TissLM, idx: torch.Tensor) -> torch.Tensor:
    """Attention weights (n_layers, B, n_heads, T, T) of every layer and head over idx (B, T).

    T x T per head: for looking inside the model on short texts, not for decoding.
    """
    B, T = idx.shape
    if idx.size(1) > model.config.max_seq_len:
        raise TissLMError(f"sequence of {T} tokens exceeds max_seq_len={model.config.max_seq_len}")
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]  # (T, head_dim)
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, T)
    x = model.tok_emb(idx)  # (B, T, d_model)
    maps = []
    for block in model.layers:
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


def attention_for_text(model: TissLM, tokenizer: Tokenizer, text: str, max_tokens: int) -> AttentionMaps:
    ids = tokenizer.encode(text).ids
    if not ids:
        raise TissLMError("text is empty")
    if len(ids) > max_tokens:
        raise TissLMError(f"text is {len(ids)} tokens; attention maps are drawn for at most {max_tokens}")
    weights = attention_maps(model, torch.tensor([ids]))[:, 0]  # (n_layers, n_heads, T, T)
    tokens = [tokenizer.decode([i]).translate(VISIBLE_WHITESPACE) for i in ids]
    return AttentionMaps(tokens, weights.float())


def save_attention_png(maps: AttentionMaps, out: Path, title: str = "") -> Path:
    """One heatmap per layer (rows) and head (columns), token labels on the outer axes."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    n_layers, n_heads, T, _ = maps.weights.shape
    future = np.triu(np.ones((T, T), dtype=bool), k=1)  # keys after the query: masked, drawn blank
    cell = max(1.6, 0.16 * T)
    fig, axes = plt.subplots(
        n_layers, n_heads, figsize=(cell * n_heads + 1, cell * n_layers + 1), squeeze=False, constrained_layout=True
    )
    image = None
    for layer in range(n_layers):
        for head in range(n_heads):
            ax = axes[layer][head]
            weights = np.ma.masked_array(maps.weights[layer, head].numpy(), mask=future)
            image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=9)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=9)
                if T <= 32:
                    ax.set_yticks(range(T), maps.tokens, fontsize=8)
            if layer == n_layers - 1 and T <= 32:
                ax.set_xticks(range(T), maps.tokens, fontsize=8, rotation=90)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight (query row → key column)")
    if title:
        fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

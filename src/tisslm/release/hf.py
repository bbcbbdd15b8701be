"""Convert between TissLM and Hugging Face `transformers`' LlamaForCausalLM.

TissLM is a Llama: same norm, same rotary convention, same feed-forward. Only the names differ,
and TissLM stores q/k/v and gate/up each fused in one matrix, which Llama keeps apart. Needs the
optional extra `tisslm[hf]`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tisslm.core.model import ModelConfig, TissLM

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM


# ModelConfig field -> LlamaConfig field, for the settings that mean the same in both.
CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "d_ff": "intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "dropout": "attention_dropout",
    "tie_embeddings": "tie_word_embeddings",
}


def llama_config(config: ModelConfig) -> LlamaConfig:
    from transformers import LlamaConfig

    llama = LlamaConfig(
        **{theirs: getattr(config, ours) for ours, theirs in CONFIG_FIELDS.items()},
        head_dim=config.head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )
    llama.rope_theta = config.rope_theta  # transformers 4.x reads this key, not rope_parameters
    return llama


def _fused_layout(config: ModelConfig, layer: int) -> list[tuple[str, list[str], list[int]]]:
    """(TissLM key, Llama keys, row sizes) for the fused matrices of one layer."""
    kv_rows = config.n_kv_heads * config.head_dim
    ours, theirs = f"layers.{layer}.", f"model.layers.{layer}."
    return [
        (
            ours + "attn.qkv.weight",
            [theirs + f"self_attn.{p}_proj.weight" for p in "qkv"],
            [config.n_heads * config.head_dim, kv_rows, kv_rows],
        ),
        (
            ours + "ffn.gate_up.weight",
            [theirs + "mlp.gate_proj.weight", theirs + "mlp.up_proj.weight"],
            [config.d_ff] * 2,
        ),
    ]


def _renames(config: ModelConfig) -> dict[str, str]:
    """TissLM key -> Llama key for the tensors that map one to one."""
    names = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(config.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        names[ours + "attn_norm.weight"] = theirs + "input_layernorm.weight"
        names[ours + "attn.o_proj.weight"] = theirs + "self_attn.o_proj.weight"
        names[ours + "ffn_norm.weight"] = theirs + "post_attention_layernorm.weight"
        names[ours + "ffn.down.weight"] = theirs + "mlp.down_proj.weight"
    return names


def to_llama_state_dict(model: TissLM) -> dict[str, torch.Tensor]:
    config, state = model.config, model.state_dict()
    out = {theirs: state[ours] for ours, theirs in _renames(config).items()}
    for i in range(config.n_layers):
        for ours, theirs, sizes in _fused_layout(config, i):
            out.update(zip(theirs, state[ours].split(sizes, dim=0), strict=True))
    return {k: v.detach().clone() for k, v in out.items()}


def to_hf(model: TissLM) -> LlamaForCausalLM:
    """A LlamaForCausalLM with the same weights, in the same dtype, in eval mode."""
    from transformers import LlamaForCausalLM

    hf_model = LlamaForCausalLM(llama_config(model.config))
    hf_model.load_state_dict(to_llama_state_dict(model), strict=not model.config.tie_embeddings)
    if model.config.tie_embeddings:
        hf_model.tie_weights()
    return hf_model.to(next(model.parameters()).dtype).eval()

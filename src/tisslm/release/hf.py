"""Convert between TissLM and Hugging Face `transformers`' LlamaForCausalLM (Qwen2ForCausalLM
for a model with q/k/v biases).

TissLM is a Llama: same norm, same rotary convention, same feed-forward. Only the names differ,
and TissLM stores q/k/v and gate/up each fused in one matrix, which Llama keeps apart. Qwen2 is
the same network plus biases on the q, k and v projections (`attention_bias`); Mistral is a
Llama with a sliding attention window, which within a context no longer than the window is
exactly full attention. Exporting (`to_hf`) needs the optional extra `tisslm[hf]`; importing a
local Llama, Mistral or Qwen2 checkpoint (`import_llama`) reads its config.json and safetensors
directly and needs no `transformers`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tisslm.core.chat import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE
from tisslm.core.errors import TissLMError, parse
from tisslm.core.io import atomic_dir
from tisslm.core.model import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, ModelConfig, TissLM

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


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


def hf_config(config: ModelConfig) -> PretrainedConfig:
    """The transformers config of the same network: Llama's, or with q/k/v biases Qwen2's (Llama's
    own attention_bias would put a bias on o_proj too)."""
    from transformers import LlamaConfig, Qwen2Config

    shared = {theirs: getattr(config, ours) for ours, theirs in CONFIG_FIELDS.items()} | {
        "head_dim": config.head_dim,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "hidden_act": "silu",
    }
    if config.attention_bias:
        hf = Qwen2Config(**shared, use_sliding_window=False, sliding_window=None)
    else:
        hf = LlamaConfig(**shared, attention_bias=False, mlp_bias=False)
    hf.rope_theta = config.rope_theta  # transformers 4.x reads this key, not rope_parameters
    return hf


def _fused_layout(config: ModelConfig, layer: int) -> list[tuple[str, list[str], list[int]]]:
    """(TissLM key, Llama keys, row sizes) for the fused matrices (and q/k/v biases) of one layer."""
    qkv_rows = [config.n_heads * config.head_dim] + [config.n_kv_heads * config.head_dim] * 2
    ours, theirs = f"layers.{layer}.", f"model.layers.{layer}."
    layout = [
        (ours + "attn.qkv.weight", [theirs + f"self_attn.{p}_proj.weight" for p in "qkv"], qkv_rows),
        (
            ours + "ffn.gate_up.weight",
            [theirs + "mlp.gate_proj.weight", theirs + "mlp.up_proj.weight"],
            [config.d_ff] * 2,
        ),
    ]
    if config.attention_bias:
        layout.append((ours + "attn.qkv.bias", [theirs + f"self_attn.{p}_proj.bias" for p in "qkv"], qkv_rows))
    return layout


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


def to_hf(model: TissLM) -> PreTrainedModel:
    """A LlamaForCausalLM (Qwen2ForCausalLM with q/k/v biases) with the same weights, in the same
    dtype, in eval mode."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    hf_class = Qwen2ForCausalLM if model.config.attention_bias else LlamaForCausalLM
    hf_model = hf_class(hf_config(model.config))
    hf_model.load_state_dict(to_llama_state_dict(model), strict=not model.config.tie_embeddings)
    if model.config.tie_embeddings:
        hf_model.tie_weights()
    return hf_model.to(next(model.parameters()).dtype).eval()


# ---- import: a local Hugging Face Llama, Mistral or Qwen2 checkpoint -> a TissLM model directory ----

HF_INDEX_FILE = "model.safetensors.index.json"
# model_type -> whether its attention has q/k/v biases (Qwen2's are hard-wired, o_proj has none).
_QKV_BIAS = {"llama": False, "mistral": False, "qwen2": True}
# Settings TissLM's model has no room for: (field, the values it can represent exactly). Llama's
# attention_bias would bias o_proj as well; Mistral's and Qwen2's sliding window: `_sliding_window`.
_MUST_BE = {
    "hidden_act": ("silu",),
    "attention_bias": (False, None),
    "mlp_bias": (False, None),
    "quantization_config": (None,),
}
_DEFAULT_ROPE = (None, "default")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TissLMError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise TissLMError(f"{path}: not a JSON object")
    return data


def _sliding_window(raw: dict[str, Any]) -> Any:
    """The attention window some layer of a Mistral or Qwen2 config uses; None when none does
    (Qwen2 keeps a `sliding_window` value that `use_sliding_window: false` switches off)."""
    if raw.get("use_sliding_window") is False:
        return None
    if raw.get("layer_types") and "sliding_attention" not in raw["layer_types"]:
        return None
    return raw.get("sliding_window")


def model_config_from_llama(raw: dict[str, Any], source: str = CONFIG_FILE) -> ModelConfig:
    """The ModelConfig of a Llama, Mistral or Qwen2 config.json (as a dict); a TissLMError names
    any field TissLM's model cannot represent exactly (`source: attention_bias=True: ...`).

    A sliding window shorter than max_position_embeddings becomes max_seq_len: within a context no
    longer than the window, sliding-window attention is exactly full attention."""

    def refuse(field: str, why: str) -> TissLMError:
        return TissLMError(f"{source}: {field}={raw.get(field)!r}: {why}; TissLM cannot represent it exactly")

    model_type = raw.get("model_type")
    if model_type not in _QKV_BIAS:
        raise refuse("model_type", f"only {', '.join(map(repr, _QKV_BIAS))} checkpoints import")
    if model_type == "llama" and raw.get("sliding_window") is not None:
        raise refuse("sliding_window", "a Llama checkpoint has no sliding window")
    for field, allowed in _MUST_BE.items():
        if raw.get(field) not in allowed:
            raise refuse(field, f"must be {' or '.join(map(repr, allowed))}")
    for field in ("rope_scaling", "rope_parameters"):  # transformers 5 keeps theta and scaling in the latter
        rope = raw.get(field) or {}
        if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type")) not in _DEFAULT_ROPE:
            raise refuse(field, "RoPE scaling is not supported (plain RoPE only)")
    rope = raw.get("rope_parameters") or {}
    hidden, heads = raw.get("hidden_size"), raw.get("num_attention_heads")
    head_dim = raw.get("head_dim")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and head_dim not in (None, hidden / heads):
        raise refuse("head_dim", f"TissLM's head_dim is hidden_size/num_attention_heads={hidden / heads:g}")
    ours: dict[str, Any] = {ours: raw[theirs] for ours, theirs in CONFIG_FIELDS.items() if raw.get(theirs) is not None}
    ours.setdefault("n_kv_heads", raw.get("num_attention_heads"))
    ours.setdefault("tie_embeddings", False)  # LlamaConfig's default
    ours["rope_theta"] = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    ours["attention_bias"] = _QKV_BIAS[model_type]
    window = _sliding_window(raw)
    if window is not None:
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise refuse("sliding_window", "must be a positive integer or null")
        ours["max_seq_len"] = min(window, ours.get("max_seq_len", window))
    return parse(ModelConfig, ours, source)


def _llama_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Llama key -> shape, for every tensor of a Llama checkpoint with this config."""
    d, f, q, kv = config.d_model, config.d_ff, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    for i in range(config.n_layers):
        layer = f"model.layers.{i}."
        shapes |= {layer + "input_layernorm.weight": (d,), layer + "post_attention_layernorm.weight": (d,)}
        shapes |= {layer + f"self_attn.{p}_proj.weight": (n, d) for p, n in (("q", q), ("k", kv), ("v", kv))}
        shapes |= {layer + "self_attn.o_proj.weight": (d, q), layer + "mlp.down_proj.weight": (d, f)}
        shapes |= {layer + f"mlp.{p}_proj.weight": (f, d) for p in ("gate", "up")}
        if config.attention_bias:
            shapes |= {layer + f"self_attn.{p}_proj.bias": (n,) for p, n in (("q", q), ("k", kv), ("v", kv))}
    return shapes


def from_llama_state_dict(
    state: dict[str, torch.Tensor], config: ModelConfig, source: str = WEIGHTS_FILE
) -> dict[str, torch.Tensor]:
    """TissLM's state dict (as saved: no lm_head.weight when tied) from a Llama one."""
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}  # recomputed, not learned
    expected = _llama_shapes(config)
    if config.tie_embeddings and "lm_head.weight" in state:
        if not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            raise TissLMError(f"{source}: lm_head.weight differs from embed_tokens though tie_word_embeddings=true")
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    if set(state) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise TissLMError(f"{source}: tensors do not match config.json (missing {missing}, unexpected {unexpected})")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise TissLMError(f"{source}: {name} has shape {tuple(state[name].shape)}, config.json implies {shape}")
    out = {ours: state[theirs] for ours, theirs in _renames(config).items()}  # no lm_head when tied
    for i in range(config.n_layers):
        for ours, theirs, _ in _fused_layout(config, i):
            out[ours] = torch.cat([state[name] for name in theirs], dim=0)
    return {k: v.contiguous() for k, v in out.items()}


def _read_weights(source: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of a checkpoint's safetensors (one file, or the shards its index names)."""
    single, index = source / WEIGHTS_FILE, source / HF_INDEX_FILE
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise TissLMError(f"{index}: weight_map: required but missing or empty")
        files = [source / name for name in sorted(set(weight_map.values()))]
    else:
        pickled = sorted(p.name for p in source.glob("*.bin")) + sorted(p.name for p in source.glob("*.pt"))
        found = f"only {', '.join(pickled)}, a pickle, which is never loaded" if pickled else "none found"
        raise TissLMError(f"{source}: needs {WEIGHTS_FILE} or {HF_INDEX_FILE} (safetensors); {found}")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            state.update(load_file(path))
        except (SafetensorError, OSError) as err:
            raise TissLMError(f"{path}: unreadable safetensors file ({err})") from None
    return state, files[0].name if len(files) == 1 else HF_INDEX_FILE


def _chat_template(source: Path) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, else tokenizer_config.json's chat_template
    (a string, or the one named "default" of a list)."""
    if (source / CHAT_TEMPLATE_FILE).is_file():
        return (source / CHAT_TEMPLATE_FILE).read_text()
    if not (source / TOKENIZER_CONFIG_FILE).is_file():
        return None
    template = _read_json(source / TOKENIZER_CONFIG_FILE).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def import_llama(source_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a TissLM model directory (config.json, model.safetensors, tokenizer.json and, if the
    checkpoint has them, chat_template.jinja and tokenizer_config.json, whose bos and eos tokens
    the template refers to: `tisslm.core.chat.ChatTemplate.load`) from a local Hugging Face Llama,
    Mistral or Qwen2 checkpoint directory.

    Everything is checked before anything is written; the directory appears whole or not at all.
    """
    from tisslm.core.tokenizer import load_tokenizer

    source, out = Path(source_dir), Path(out_dir)
    if not source.is_dir():
        raise TissLMError(f"{source}: not a directory")
    if not (source / CONFIG_FILE).is_file():
        raise TissLMError(f"{source / CONFIG_FILE}: not found (is {source} a Hugging Face checkpoint?)")
    if not (source / TOKENIZER_FILE).is_file():
        raise TissLMError(f"{source / TOKENIZER_FILE}: not found; TissLM needs the checkpoint's fast tokenizer")
    raw = _read_json(source / CONFIG_FILE)
    config = model_config_from_llama(raw, str(source / CONFIG_FILE))
    if config.max_seq_len < (raw.get("max_position_embeddings") or 0):
        print(
            f"import: max_seq_len={config.max_seq_len}, the sliding window (max_position_embeddings="
            f"{raw['max_position_embeddings']}): within it, sliding-window attention is exactly full attention"
        )
    tokenizer = load_tokenizer(source)
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise TissLMError(
            f"{source / TOKENIZER_FILE}: {tokenizer.get_vocab_size()} tokens exceed vocab_size={config.vocab_size}"
        )
    llama_state, weights_name = _read_weights(source)
    state = from_llama_state_dict(llama_state, config, str(source / weights_name))
    template = _chat_template(source)
    with atomic_dir(out) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config.model_dump(), indent=2) + "\n")
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        shutil.copyfile(source / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        if template is not None:
            (tmp / CHAT_TEMPLATE_FILE).write_text(template)
        if (source / TOKENIZER_CONFIG_FILE).is_file():
            shutil.copyfile(source / TOKENIZER_CONFIG_FILE, tmp / TOKENIZER_CONFIG_FILE)
        TissLM.from_pretrained(tmp)  # the directory loads, or nothing replaces `out`
    return out

"""Export a TissLM to the formats other tools run: a Hugging Face directory, ONNX and GGUF.

- Hugging Face: a Llama config (Qwen2's for a model with q/k/v biases), safetensors and a fast
  tokenizer that `AutoModelForCausalLM` and `AutoTokenizer` load offline. (transformers 5 loads a
  Qwen2 directory's tokenizer with Qwen's own pre-tokenizer: `hf_parity` shows whether it agrees.)
- ONNX: optimum's layout for a Llama decoder: `model.onnx` with `input_ids`, `attention_mask`,
  `position_ids` and the KV cache as inputs and outputs (`past_key_values.{i}.key` ...
  `present.{i}.value`), dynamic batch, sequence and past lengths (the first step passes an empty
  past), beside config.json, generation_config.json and the tokenizer (what optimum loads) and
  genai_config.json (what onnxruntime-genai loads).
- GGUF (llama.cpp): architecture `llama`, tensors named as llama.cpp's own converter names
  them, q/k rows permuted to llama.cpp's interleaved rotary layout (the converter does the same
  for Hugging Face Llama weights), norms in F32 and matrices in F16 or Q8_0, the BPE vocabulary
  and merges in the tokenizer metadata. q/k/v biases, if any, are the optional `attn_q.bias` ...
  tensors llama.cpp's `llama` architecture loads (in F32, q and k permuted as their rows).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from tisslm.core.chat import ChatTemplate
from tisslm.core.io import atomic_dir
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import END_OF_TEXT
from tisslm.release.hf import hf_config, to_hf, to_llama_state_dict

GGUF_TYPES = ("F16", "Q8_0")
ONNX_FILE = "model.onnx"
PAD = "<|pad|>"


def _hf_tokenizer(tokenizer: Tokenizer, chat_template: ChatTemplate | None):
    """The fast tokenizer transformers loads; with the model's chat template, so that
    `apply_chat_template` formats conversations as TissLM's server and fine-tuning do."""
    from transformers import PreTrainedTokenizerFast

    pad = PAD if tokenizer.token_to_id(PAD) is not None else END_OF_TEXT
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT, pad_token=pad
    )
    fast.chat_template = chat_template.source if chat_template else None
    return fast


def _save_tokenizer(fast, directory: Path) -> None:
    """tokenizer.json and its config, named as transformers 4.x and 5.x both know it: 5.x would
    write `TokenizersBackend`, a class 4.x lacks (optimum-onnx still needs 4.x). Without
    `model_input_names`, 4.x also returns token_type_ids, which `generate()` rejects."""
    fast.save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_input_names"] = ["input_ids", "attention_mask"]
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _special_token_ids(fast) -> dict[str, int]:
    return {"bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id, "pad_token_id": fast.pad_token_id}


def _with_token_ids(config, fast):
    """A Llama config naming the tokenizer's special tokens (LlamaConfig's defaults are another vocabulary's)."""
    for name, value in _special_token_ids(fast).items():
        setattr(config, name, value)
    return config


def export_hf(model: TissLM, tokenizer: Tokenizer, directory: Path, chat_template: ChatTemplate | None = None) -> Path:
    from transformers import GenerationConfig

    fast = _hf_tokenizer(tokenizer, chat_template)
    with atomic_dir(directory) as tmp:
        hf_model = to_hf(model)
        _with_token_ids(hf_model.config, fast)
        hf_model.generation_config = GenerationConfig(**_special_token_ids(fast))
        hf_model.save_pretrained(tmp, safe_serialization=True)
        _save_tokenizer(fast, tmp)
    return directory


class ConcatKVCache:
    """The model's cache interface (`tisslm.core.cache.Cache`) over past keys and values given as
    tensors, an exported graph's inputs: each update concatenates, which an exported graph can
    express (the preallocated cache writes in place, which it cannot). Positions and the mask come
    from optimum's inputs: rotary positions counted from each row's first real token, and
    attention_mask (B, P + T) marking real tokens among the past and new ones (0 for left pads)."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], attention_mask, position_ids):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(past)
        self.attention_mask, self.position_ids = attention_mask, position_ids

    def positions(self, new_tokens: int) -> torch.Tensor:
        return self.position_ids  # (B, T)

    def mask(self) -> torch.Tensor:
        past, new = self.past[0][0].shape[2], self.position_ids.shape[1]
        key_pos = torch.arange(past + new, device=self.position_ids.device)  # (S,)
        query_pos = key_pos[past:]  # (T,)
        causal = key_pos[None, :] <= query_pos[:, None]  # (T, S)
        real_key = self.attention_mask.bool()[:, None, :]  # (B, 1, S)
        # A pad query attends to itself, so no row of the mask is empty (softmax would give NaN).
        mask = (causal[None] & real_key) | (key_pos[None, :] == query_pos[:, None])[None]  # (B, T, S)
        return mask.unsqueeze(1)  # (B, 1, T, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        past_k, past_v = self.past[layer]
        self.present[layer] = (torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2))
        return self.present[layer]

    def advance(self, new_tokens: int) -> None:
        pass  # the caller holds the present keys and values


class OnnxDecoder(torch.nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present), past and present
    flat as (key, value) per layer: the inputs and outputs of optimum's Llama decoder. One graph
    serves prefill and decode of left-padded batches."""

    def __init__(self, model: TissLM):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past_flat: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        past = list(zip(past_flat[0::2], past_flat[1::2], strict=True))
        cache = ConcatKVCache(past, attention_mask, position_ids)
        logits = self.model(input_ids, cache=cache)  # (B, T, vocab_size)
        return (logits, *[t for kv in cache.present for t in kv])


def onnx_names(n_layers: int) -> tuple[list[str], list[str]]:
    pairs = [(i, kind) for i in range(n_layers) for kind in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{i}.{k}" for i, k in pairs]
    return inputs, ["logits"] + [f"present.{i}.{k}" for i, k in pairs]


def export_onnx(
    model: TissLM, tokenizer: Tokenizer, directory: Path, chat_template: ChatTemplate | None = None
) -> Path:
    """`model.onnx` beside config.json, generation_config.json, the tokenizer and genai_config.json:
    the directory optimum's `ORTModelForCausalLM.from_pretrained` and `AutoTokenizer` load, and
    onnxruntime-genai's `Model` too."""
    from torch.export import Dim
    from transformers import GenerationConfig

    c = model.config
    model = model.eval()
    inputs, outputs = onnx_names(c.n_layers)
    example_past = [torch.zeros(2, c.n_kv_heads, 3, c.head_dim) for _ in range(2 * c.n_layers)]
    example = (torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 8, dtype=torch.long),
               torch.arange(3, 8).repeat(2, 1), *example_past)  # fmt: skip
    # Tracing bounds keep past + sequence within max_seq_len; the graph itself takes any lengths
    # up to it, an empty past and one-token steps included.
    batch = Dim("batch", min=1, max=1024)
    sequence = Dim("sequence", min=2, max=c.max_seq_len // 2)
    past = Dim("past_sequence", min=1, max=c.max_seq_len // 2 - 1)
    shapes = ({0: batch, 1: sequence}, {0: batch, 1: Dim.DYNAMIC}, {0: batch, 1: sequence},
              tuple({0: batch, 2: past} for _ in example_past))  # fmt: skip
    fast = _hf_tokenizer(tokenizer, chat_template)
    with atomic_dir(directory) as tmp:
        torch.onnx.export(
            OnnxDecoder(model).eval(), example, str(tmp / ONNX_FILE),
            dynamo=True, dynamic_shapes=shapes, input_names=inputs, output_names=outputs, verbose=False,
        )  # fmt: skip
        _with_token_ids(hf_config(c), fast).save_pretrained(tmp)
        GenerationConfig(**_special_token_ids(fast)).save_pretrained(tmp)
        _save_tokenizer(fast, tmp)
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(c, _special_token_ids(fast)), indent=2) + "\n")
    return directory


def genai_config(config, token_ids: dict[str, int]) -> dict:
    """onnxruntime-genai's description of the same graph: its inputs and outputs by name, and a
    KV cache that grows by concatenation (`past_present_share_buffer` off), as the graph's does."""
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
             "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}  # fmt: skip
    decoder = {
        "filename": ONNX_FILE,
        "session_options": {"provider_options": []},
        "head_size": config.head_dim,
        "hidden_size": config.d_model,
        "num_attention_heads": config.n_heads,
        "num_hidden_layers": config.n_layers,
        "num_key_value_heads": config.n_kv_heads,
        "inputs": names,
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
    }
    model = {
        "type": "qwen2" if config.attention_bias else "llama",
        "vocab_size": config.vocab_size,
        "context_length": config.max_seq_len,
        "decoder": decoder,
    }
    search = {"do_sample": False, "num_beams": 1, "max_length": config.max_seq_len, "past_present_share_buffer": False}
    return {"model": {**model, **token_ids}, "search": search}


def onnx_greedy(session, config, prompts: list[list[int]], new_tokens: int, pad: int = 0) -> list[list[int]]:
    """Greedy continuations of a left-padded batch, computed by onnxruntime alone: the attention
    mask and positions as optimum builds them, `present` fed back as `past`."""
    inputs, _ = onnx_names(config.n_layers)
    width = max(map(len, prompts))
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
    ids = np.array([[pad] * (width - len(p)) + p for p in prompts], dtype=np.int64)
    positions = np.where(mask == 1, mask.cumsum(-1) - 1, 1)
    past = [np.zeros((len(prompts), config.n_kv_heads, 0, config.head_dim), dtype=np.float32)] * (2 * config.n_layers)
    out = np.zeros((len(prompts), 0), dtype=np.int64)
    for _ in range(new_tokens):
        logits, *past = session.run(None, dict(zip(inputs, [ids, mask, positions, *past], strict=True)))
        ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)  # (B, 1)
        out = np.concatenate((out, ids), axis=1)
        positions = positions[:, -1:] + 1
        mask = np.concatenate((mask, np.ones_like(ids)), axis=1)
    return out.tolist()


@torch.no_grad()
def onnx_parity(model: TissLM, directory: Path, tokenizer: Tokenizer, text: str, new_tokens: int = 32) -> dict:
    """onnxruntime against torch: logits with and without a past, and greedy continuations of a
    left-padded batch (the text and two shorter prefixes of it) row for row."""
    import onnxruntime

    from tisslm.core.generate import generate

    session = onnxruntime.InferenceSession(str(directory / ONNX_FILE), providers=["CPUExecutionProvider"])
    c, model = model.config, model.eval()
    inputs, _ = onnx_names(c.n_layers)
    ids = tokenizer.encode(text).ids
    worst = 0.0
    for split in (0, len(ids) // 2, len(ids) - 1):  # no past, half a past, one-token step
        expected = model(torch.tensor([ids]))[0, split:].numpy()
        empty = [np.zeros((1, c.n_kv_heads, 0, c.head_dim), dtype=np.float32)] * (2 * c.n_layers)
        feed = [np.array([ids[:split]], dtype=np.int64), np.ones((1, split), dtype=np.int64),
                np.arange(split)[None], *empty]  # fmt: skip
        past = session.run(None, dict(zip(inputs, feed, strict=True)))[1:] if split else empty
        feed = [np.array([ids[split:]], dtype=np.int64), np.ones((1, len(ids)), dtype=np.int64),
                np.arange(split, len(ids))[None], *past]  # fmt: skip
        worst = max(
            worst, float(np.abs(session.run(None, dict(zip(inputs, feed, strict=True)))[0][0] - expected).max())
        )
    prompts = [ids, ids[: len(ids) // 2], ids[: len(ids) // 4 + 1]]
    ours = [generate(model, [p], new_tokens, temperature=0)[0] for p in prompts]
    theirs = onnx_greedy(session, c, prompts, new_tokens, pad=tokenizer.token_to_id(END_OF_TEXT))
    return {
        "file_bytes": sum(f.stat().st_size for f in directory.glob(f"{ONNX_FILE}*")),  # the graph and its weights
        "max_abs_logit_diff": worst,
        "greedy_tokens": new_tokens,
        "greedy_rows": len(prompts),
        "greedy_identical": ours == theirs,
    }


def _llama_cpp_rotary_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection (or its bias) from rotate-half pairing (i, i + d/2) to interleaved (2i, 2i + 1)."""
    rows, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model: TissLM) -> dict[str, torch.Tensor]:
    """llama.cpp tensor name -> weight, from the Llama-format state dict."""
    c, state = model.config, to_llama_state_dict(model)
    tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
    }
    if not c.tie_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    names = {"input_layernorm": "attn_norm", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "self_attn.v_proj": "attn_v"}  # fmt: skip
    for i in range(c.n_layers):
        hf = f"model.layers.{i}."
        for theirs, ours in names.items():
            tensors[f"blk.{i}.{ours}.weight"] = state[f"{hf}{theirs}.weight"]
        tensors[f"blk.{i}.attn_q.weight"] = _llama_cpp_rotary_permute(state[f"{hf}self_attn.q_proj.weight"], c.n_heads)
        tensors[f"blk.{i}.attn_k.weight"] = _llama_cpp_rotary_permute(
            state[f"{hf}self_attn.k_proj.weight"], c.n_kv_heads
        )
        if c.attention_bias:  # a bias is permuted as the rows it adds to
            tensors[f"blk.{i}.attn_q.bias"] = _llama_cpp_rotary_permute(state[f"{hf}self_attn.q_proj.bias"], c.n_heads)
            tensors[f"blk.{i}.attn_k.bias"] = _llama_cpp_rotary_permute(
                state[f"{hf}self_attn.k_proj.bias"], c.n_kv_heads
            )
            tensors[f"blk.{i}.attn_v.bias"] = state[f"{hf}self_attn.v_proj.bias"]
    return tensors


def _bpe_vocabulary(tokenizer: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    spec = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    import gguf

    types = [int(gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL) for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, types, merges


def export_gguf(
    model: TissLM, tokenizer: Tokenizer, path: Path, tensor_type: str, chat_template: ChatTemplate | None = None
) -> Path:
    import gguf

    if tensor_type not in GGUF_TYPES:
        raise ValueError(f"tensor_type {tensor_type!r}: one of {GGUF_TYPES}")
    qtype = gguf.GGMLQuantizationType[tensor_type]
    c = model.config
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch="llama")
    writer.add_name("TissLM")
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.d_ff)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if tensor_type == "F16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    tokens, types, merges = _bpe_vocabulary(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(
        "gpt-2"
    )  # GPT-2's split regex, as ByteLevel's; llama.cpp's default splits digits otherwise
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    end = tokenizer.token_to_id(END_OF_TEXT)
    writer.add_bos_token_id(end)
    writer.add_eos_token_id(end)
    if chat_template is not None:  # llama.cpp's chat formats it, and ends a reply at the end-of-turn token
        writer.add_chat_template(chat_template.source)
        turn_ends = [t for t in chat_template.stop_token_ids(tokenizer) if t != end]
        if turn_ends:
            writer.add_eot_token_id(turn_ends[0])
    for name, tensor in gguf_tensors(model).items():
        data = tensor.detach().float().numpy()
        if data.ndim == 1:  # norms and biases: small, and precision-sensitive
            writer.add_tensor(name, data.astype(np.float32))
        elif tensor_type == "F16" or data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            # Q8_0 packs rows in blocks of 32: a row of another width stays F16, as llama.cpp's converter does.
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


def gguf_parity(model: TissLM, path: Path) -> dict:
    """Read the file back: tensor shapes, metadata, and the worst relative error of any matrix."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    expected = gguf_tensors(model)
    worst, shapes_match = 0.0, True
    for tensor in reader.tensors:
        original = expected[tensor.name].detach().float().numpy()
        shapes_match &= [int(n) for n in reversed(tensor.shape)] == list(
            original.shape
        )  # GGUF lists dims fastest-first
        restored = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(original.shape)
        scale = np.abs(original).max() or 1.0
        worst = max(worst, float(np.abs(restored - original).max() / scale))
    field = reader.fields["llama.block_count"]
    return {
        "file_bytes": path.stat().st_size,
        "tensors": len(reader.tensors),
        "tensors_expected": len(expected),
        "shapes_match": bool(shapes_match),
        "block_count": int(field.parts[field.data[0]][0]),
        "max_relative_error": worst,
    }


@torch.no_grad()
def hf_parity(model: TissLM, directory: Path, tokenizer: Tokenizer, text: str) -> dict:
    """Load the export the way its users will, offline, and compare logits with TissLM's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    hf_model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    ids = hf_tokenizer(text, return_tensors="pt")["input_ids"]
    theirs = hf_model(input_ids=ids).logits
    ours = model.eval()(ids)
    return {
        "tokenizer_ids_match": ids[0].tolist() == tokenizer.encode(text).ids,
        "max_abs_logit_diff": float((theirs - ours).abs().max()),
        "tokens_compared": int(ids.numel()),
    }

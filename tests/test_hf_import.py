"""Import: a local Hugging Face Llama, Mistral or Qwen2 checkpoint becomes a TissLM model with
equal logits, or is refused in one line naming the field TissLM cannot represent (issue 25); a
model with Qwen2's q/k/v biases exports to every format with them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_model

from tisslm.core.chat import ChatTemplate
from tisslm.core.errors import TissLMError
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import byte_level_tokenizer
from tisslm.release.export import export_hf
from tisslm.release.hf import import_llama

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


def llama_checkpoint(directory, seed=0, with_tokenizer=True, **overrides):
    """A tiny random LlamaForCausalLM saved as safetensors, with a byte-level tokenizer.json and a
    tokenizer_config.json holding a chat template and the bos and eos tokens it refers to."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        rope_theta=50000.0,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)  # norm gains away from 1 so a mis-mapped one shows
    model.eval().save_pretrained(directory, safe_serialization=True)
    if with_tokenizer:
        byte_level_tokenizer().save(str(directory / "tokenizer.json"))
        tokens = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>"}
        (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE} | tokens))
    return model


def edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_key_value_heads": 4, "tie_word_embeddings": False},
        {"num_key_value_heads": 2, "tie_word_embeddings": True},  # GQA, tied head
    ],
    ids=["plain", "gqa-tied"],
)
@torch.no_grad()
def test_import_gives_transformers_logits(tmp_path, overrides):
    hf_model = llama_checkpoint(tmp_path / "hf", **overrides)
    out = import_llama(tmp_path / "hf", tmp_path / "model")
    model = TissLM.from_pretrained(out).eval()
    assert model.config.n_kv_heads == overrides["num_key_value_heads"]
    assert model.config.tie_embeddings is overrides["tie_word_embeddings"] and model.config.rope_theta == 50000.0
    idx = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    diff = (model(idx) - hf_model(idx).logits).abs().max().item()
    assert diff < 1e-4
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()
    assert (out / "chat_template.jinja").read_text() == TEMPLATE
    template = ChatTemplate.load(out)  # the copied tokenizer_config.json names the template's bos and eos
    assert (template.source, template.bos_token, template.eos_token) == (TEMPLATE, "<s>", "</s>")


def test_tisslm_export_then_import_gives_identical_weights(tmp_path):
    model = make_model(vocab_size=257, max_seq_len=64)
    export_hf(model, byte_level_tokenizer(), tmp_path / "hf")
    back = TissLM.from_pretrained(import_llama(tmp_path / "hf", tmp_path / "model"))
    assert back.config == model.config
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"model_type": "gemma"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "rope_parameters"),
        ({"head_dim": 32}, "head_dim"),
    ],
)
def test_unrepresentable_configs_are_refused_naming_the_field(tmp_path, changes, field):
    llama_checkpoint(tmp_path / "hf")
    edit_config(tmp_path / "hf", **changes)
    with pytest.raises(TissLMError, match=rf"config\.json: {field}=") as err:
        import_llama(tmp_path / "hf", tmp_path / "model")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "model").exists()


def test_pickled_weights_are_refused_and_a_missing_tokenizer_is_named(tmp_path):
    llama_checkpoint(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(TissLMError, match=r"model\.safetensors.*pytorch_model\.bin.*never loaded"):
        import_llama(tmp_path / "hf", tmp_path / "model")
    llama_checkpoint(tmp_path / "bare", with_tokenizer=False)
    with pytest.raises(TissLMError, match=r"tokenizer\.json: not found"):
        import_llama(tmp_path / "bare", tmp_path / "model")
    assert not (tmp_path / "model").exists()


@torch.no_grad()
def test_sharded_checkpoint_imports(tmp_path):
    hf_model = llama_checkpoint(tmp_path / "hf")
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="100KB")
    (tmp_path / "hf" / "model.safetensors").unlink(missing_ok=True)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model = TissLM.from_pretrained(import_llama(tmp_path / "hf", tmp_path / "model")).eval()
    idx = torch.randint(0, 300, (1, 16))
    assert (model(idx) - hf_model(idx).logits).abs().max().item() < 1e-4


def tisslm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tisslm.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_imports_then_generates_and_refuses_in_one_line(tmp_path):
    llama_checkpoint(tmp_path / "hf", num_key_value_heads=2)
    result = tisslm("import", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "model"))
    assert result.returncode == 0, result.stderr
    result = tisslm("generate", "--model", str(tmp_path / "model"), "--prompt", "x", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("x")

    edit_config(tmp_path / "hf", attention_bias=True)
    result = tisslm("import", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "bad"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "attention_bias" in result.stderr
    assert not (tmp_path / "bad").exists()


def test_transformers4_style_config_maps_with_defaults():
    """rope_theta at the top, rope_scaling null or default, no num_key_value_heads (then = heads)."""
    from tisslm.release.hf import model_config_from_llama

    raw = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
           "intermediate_size": 96, "vocab_size": 300, "max_position_embeddings": 64, "rope_theta": 5e5,
           "rope_scaling": {"rope_type": "default"}, "num_key_value_heads": None, "hidden_act": "silu"}  # fmt: skip
    config = model_config_from_llama(raw)
    assert (config.rope_theta, config.n_kv_heads, config.tie_embeddings) == (5e5, 4, False)


# ---- Qwen2 (q/k/v biases) and Mistral (sliding window) ----

SMALL = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=64, rope_theta=50000.0)  # fmt: skip


def hf_checkpoint(directory, config):
    """A tiny random checkpoint of `config`'s architecture, biases and norm gains drawn away from
    0 and 1 so that a dropped or mis-mapped one shows, saved with a byte-level tokenizer.json."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory, safe_serialization=True)
    byte_level_tokenizer().save(str(directory / "tokenizer.json"))
    return model


@torch.no_grad()
def test_qwen2_imports_with_its_attention_biases_and_gives_transformers_logits(tmp_path):
    from transformers import Qwen2Config

    hf_model = hf_checkpoint(tmp_path / "hf", Qwen2Config(**SMALL, tie_word_embeddings=True))
    model = TissLM.from_pretrained(import_llama(tmp_path / "hf", tmp_path / "model")).eval()
    assert model.config.attention_bias and model.config.max_seq_len == 64 and model.config.tie_embeddings
    idx = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(1))
    assert (model(idx) - hf_model(idx).logits).abs().max().item() < 1e-4


@torch.no_grad()
def test_mistral_sliding_window_becomes_max_seq_len_with_transformers_logits(tmp_path, capsys):
    from transformers import MistralConfig

    hf_model = hf_checkpoint(tmp_path / "hf", MistralConfig(**SMALL, sliding_window=16))
    model = TissLM.from_pretrained(import_llama(tmp_path / "hf", tmp_path / "model")).eval()
    assert "max_seq_len=16" in capsys.readouterr().out
    assert model.config.max_seq_len == 16 and not model.config.attention_bias
    idx = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    assert (model(idx) - hf_model(idx).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "window, expected",
    [
        ({"use_sliding_window": False, "sliding_window": 16}, 64),  # transformers 4.x keeps the unused value
        ({"use_sliding_window": True, "sliding_window": 16, "layer_types": ["full_attention"] * 2}, 64),
        (
            {"use_sliding_window": True, "sliding_window": 16, "layer_types": ["full_attention", "sliding_attention"]},
            16,
        ),
        ({"use_sliding_window": True, "sliding_window": 4096}, 64),  # no shorter than the context
    ],
)
def test_a_qwen2_window_shortens_the_context_only_where_a_layer_uses_it(window, expected):
    from tisslm.release.hf import model_config_from_llama

    raw = {"model_type": "qwen2", "hidden_act": "silu", **SMALL, **window}
    config = model_config_from_llama(raw)
    assert (config.max_seq_len, config.attention_bias) == (expected, True)
    with pytest.raises(TissLMError, match=r"config\.json: sliding_window=0: "):
        model_config_from_llama({**raw, "use_sliding_window": True, "sliding_window": 0, "layer_types": None})


@pytest.fixture(scope="module")
def biased():
    """A TissLM with q/k/v biases, a trained BPE (llama.cpp needs merges) and its vocabulary."""
    from runtimes import bpe_tokenizer, code_model

    tokenizer = bpe_tokenizer()
    return code_model(tokenizer, attention_bias=True, max_seq_len=64), tokenizer


def test_a_biased_model_exports_as_qwen2_and_imports_back_identical(tmp_path):
    """transformers 5 loads a qwen2 directory's tokenizer as Qwen2Tokenizer, Qwen's own pre-tokenizer
    regex: exact for Qwen's vocabulary and for a byte-level one, not for a BPE trained by TissLM."""
    from tisslm.release.export import hf_parity

    model, tokenizer = make_model(vocab_size=257, max_seq_len=64, attention_bias=True), byte_level_tokenizer()
    export_hf(model, tokenizer, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    parity = hf_parity(model, tmp_path / "hf", tokenizer, "def f(x):\n    return x * 2\n")
    assert parity["tokenizer_ids_match"] and parity["max_abs_logit_diff"] < 1e-4
    back = TissLM.from_pretrained(import_llama(tmp_path / "hf", tmp_path / "model"))
    assert back.config == model.config
    ours, theirs = model.state_dict(), back.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_biased_model_exports_to_onnx_with_equal_logits_and_greedy_text(biased, tmp_path):
    from tisslm.release.export import export_onnx, onnx_parity

    model, tokenizer = biased
    export_onnx(model, tokenizer, tmp_path / "onnx")
    assert json.loads((tmp_path / "onnx" / "config.json").read_text())["model_type"] == "qwen2"
    parity = onnx_parity(model, tmp_path / "onnx", tokenizer, "def f(x):\n    return x + 1\n", new_tokens=8)
    assert parity["max_abs_logit_diff"] < 1e-4 and parity["greedy_identical"]


@pytest.mark.slow  # needs llama-cpp-python, which `make test-slow` installs
@torch.no_grad()
def test_llama_cpp_applies_the_biases_of_the_gguf_export(biased, tmp_path):
    """llama.cpp's `llama` architecture loads the optional attn_q/k/v.bias tensors: its logits match
    TissLM's (matrices rounded to F16 as the file holds them), and are far from the bias-free model's."""
    import copy

    import llama_cpp
    import numpy as np

    from tisslm.release.export import export_gguf

    model, tokenizer = biased
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "F16")
    rounded = copy.deepcopy(model)
    for param in rounded.parameters():
        if param.dim() == 2:
            param.copy_(param.half().float())
    unbiased = copy.deepcopy(rounded)
    for layer in unbiased.layers:
        layer.attn.qkv.bias.zero_()
    ids = tokenizer.encode("def total(items):\n    return sum(items)\n").ids
    runtime = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    try:
        runtime.eval(ids)
        theirs = torch.from_numpy(np.asarray(runtime.scores[: len(ids)]))
    finally:
        runtime.close()
    ours = rounded(torch.tensor([ids]))[0]
    assert (theirs - ours).abs().max().item() < 2e-2
    assert (theirs - unbiased(torch.tensor([ids]))[0]).abs().max().item() > 0.5


@pytest.mark.parametrize("scheme", ["int8_weight_only", "int8_dynamic_activation"])
@torch.no_grad()
def test_quantization_keeps_the_attention_biases(biased, tmp_path, scheme):
    from tisslm.release.quantize import load_quantized, quantize_model, save_quantized

    model, tokenizer = biased
    quantized = quantize_model(model, scheme)
    back = load_quantized(save_quantized(quantized, scheme, tmp_path / "q", tokenizer))
    kept = back.layers[0].attn.qkv.bias  # in the dtype the scheme computes in (bf16 for weight-only, where native)
    assert torch.equal(kept, model.layers[0].attn.qkv.bias.to(kept.dtype)) and kept.abs().sum() > 0
    idx = torch.randint(0, model.config.vocab_size, (1, 20))
    assert torch.equal(back(idx), quantized(idx))

"""Import: a local Hugging Face Llama checkpoint becomes a TissLM model with equal logits, or is
refused in one line naming the field TissLM cannot represent (issue 25)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_model

from tisslm.core.errors import TissLMError
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import byte_level_tokenizer
from tisslm.release.export import export_hf
from tisslm.release.hf import import_llama

TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


def llama_checkpoint(directory, seed=0, with_tokenizer=True, **overrides):
    """A tiny random LlamaForCausalLM saved as safetensors, with a byte-level tokenizer.json and a
    tokenizer_config.json holding a chat template."""
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
        (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
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
        ({"model_type": "qwen2"}, "model_type"),
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

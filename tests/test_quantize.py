"""int8 quantization with torchao: smaller, close in quality, stored as safetensors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from tisslm.core.errors import TissLMError
from tisslm.core.generate import generate
from tisslm.core.tokenizer import END_OF_TEXT, byte_level_tokenizer
from tisslm.release.quantize import (
    SCHEMES,
    activation_dtype,
    compare,
    linear_weight_bytes,
    load_quantized,
    quantize_model,
    save_quantized,
)

TEXTS = [
    "def handler(request):\n    return respond(request.items, status=200)\n" * 3,
    "x = [i * i for i in range(10)]\n",
]


@pytest.fixture(scope="module")
def model():
    return make_model(vocab_size=257, d_model=64, d_ff=128, max_seq_len=128)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_model_round_trips_through_safetensors(model, tmp_path, scheme):
    quantized = quantize_model(model, scheme)
    assert type(quantized.layers[0].attn.qkv.weight).__name__ == "Int8Tensor"
    assert model.layers[0].attn.qkv.weight.dtype == torch.float32  # the original is left alone
    save_quantized(quantized, scheme, tmp_path / "q", byte_level_tokenizer())
    loaded = load_quantized(tmp_path / "q")
    idx = torch.randint(0, 257, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(idx), quantized(idx))
        assert (loaded(idx) - model(idx)).abs().max() < 0.1 * model(idx).abs().max()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_compare_reports_size_speed_and_quality(model, scheme):
    quantized = quantize_model(model, scheme)
    result = compare(model, quantized, byte_level_tokenizer(), TEXTS, window=64, decode_tokens=8, repeats=1)
    assert result["linear_weight_size_ratio"] > 3.5  # int8 plus one scale per row
    assert linear_weight_bytes(model) == result["linear_weight_bytes"]["reference"]
    assert abs(result["bits_per_byte_relative_increase"]) < 0.02
    assert result["decode_tokens_per_s"]["quantized"] > 0


def test_weight_only_int8_computes_in_bf16_where_bf16_is_native():
    """Weight-only int8 pays on a CPU only with bf16 activations (one int8-weight kernel per matmul);
    int8 dynamic quantizes fp32 activations; without native bf16 everything stays fp32."""
    assert activation_dtype("int8_weight_only", bf16_native=True) == torch.bfloat16
    assert activation_dtype("int8_weight_only", bf16_native=False) == torch.float32
    assert activation_dtype("int8_dynamic_activation", bf16_native=True) == torch.float32


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_quantized_model_decodes_the_same_tokens_compiled_and_eager(model, scheme):
    quantized = quantize_model(model, scheme)
    prompts = [[5, 17, 3, 44], [8]]
    eager = generate(quantized, prompts, 16, temperature=0)
    assert generate(quantized, prompts, 16, temperature=0, compile=True) == eager


def test_damaged_quantized_directory_is_one_line_error(tmp_path):
    with pytest.raises(TissLMError, match="not a quantized TissLM directory"):
        load_quantized(tmp_path / "missing")


def test_the_cli_generates_from_a_quantized_directory(model, tmp_path):
    """models/quantized/<scheme> is usable as it is: `tisslm generate` and `info` load it as int8."""
    import subprocess
    import sys

    quantized = quantize_model(model, "int8_weight_only")
    save_quantized(quantized, "int8_weight_only", tmp_path / "q", byte_level_tokenizer())
    prompt = "def f(x):"
    run = [sys.executable, "-m", "tisslm.cli"]
    out = subprocess.run(
        [*run, "generate", "--model", str(tmp_path / "q"), "--prompt", prompt, "--temperature", "0",
         "--max-new-tokens", "12"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    tokenizer = byte_level_tokenizer()
    stop = [tokenizer.token_to_id(END_OF_TEXT)]
    expected = generate(
        quantized, [tokenizer.encode(prompt).ids], 12, temperature=0, stop_tokens=stop, vocab_limit=257
    )[0]
    assert out.stdout.rstrip("\n") == prompt + tokenizer.decode(expected)
    info = subprocess.run([*run, "info", "--model", str(tmp_path / "q"), "--json"], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr

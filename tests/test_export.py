"""Export: the Hugging Face directory loads offline with equal logits; GGUF reads back right."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_model

from tisslm.core.model import apply_rope, rope_tables
from tisslm.core.tokenizer import byte_level_tokenizer
from tisslm.release.export import (
    _llama_cpp_rotary_permute,
    export_gguf,
    export_hf,
    gguf_parity,
    gguf_tensors,
    hf_parity,
)


@pytest.fixture
def model_and_tokenizer():
    return make_model(vocab_size=257, max_seq_len=64), byte_level_tokenizer()


def test_hf_export_loads_offline_with_equal_logits(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    export_hf(model, tokenizer, tmp_path / "hf")
    parity = hf_parity(model, tmp_path / "hf", tokenizer, "def f(x):\n    return x * 2  # ✓\n")
    assert parity["tokenizer_ids_match"]
    assert parity["max_abs_logit_diff"] < 1e-4 and parity["tokens_compared"] > 10


@pytest.mark.parametrize("tensor_type, tolerance", [("F16", 1e-3), ("Q8_0", 1e-2)])
def test_gguf_reads_back_with_shapes_metadata_and_values(model_and_tokenizer, tmp_path, tensor_type, tolerance):
    import gguf

    model, tokenizer = model_and_tokenizer
    path = export_gguf(model, tokenizer, tmp_path / f"m-{tensor_type}.gguf", tensor_type)
    parity = gguf_parity(model, path)
    assert parity["shapes_match"] and parity["tensors"] == parity["tensors_expected"] == 2 + 9 * 2
    assert parity["block_count"] == 2 and parity["max_relative_error"] < tolerance
    reader = gguf.GGUFReader(str(path))

    def field(name):
        f = reader.fields[name]
        return f.parts[f.data[0]].tolist()

    assert field("llama.attention.head_count") == [4] and field("llama.attention.head_count_kv") == [2]
    assert bytes(field("general.architecture")).decode() == "llama"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 257
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.ffn_up.weight"] == tensor_type


def test_exports_carry_the_chat_template(tmp_path):
    """An HF client's apply_chat_template gives exactly the prompt TissLM's server builds; the GGUF
    holds the template and names the end-of-turn token, so llama.cpp's chat stops where ours does."""
    import gguf
    from transformers import AutoTokenizer

    from tisslm.core.chat import TURN_END, TURN_START, ChatTemplate

    tokenizer = byte_level_tokenizer()
    tokenizer.add_special_tokens([TURN_START, TURN_END])
    model, template = make_model(vocab_size=259, max_seq_len=64), ChatTemplate()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sum a list?"}]
    export_hf(model, tokenizer, tmp_path / "hf", template)
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    rendered = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == template.render(messages)
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "F16", template)
    reader = gguf.GGUFReader(str(path))
    stored = reader.fields["tokenizer.chat_template"]
    assert bytes(stored.parts[stored.data[0]]).decode() == template.source
    eot = reader.fields["tokenizer.ggml.eot_token_id"]
    assert eot.parts[eot.data[0]].tolist() == [tokenizer.token_to_id(TURN_END)]


def test_gguf_q8_keeps_rows_that_do_not_fill_its_blocks_in_f16(tmp_path):
    """Q8_0 packs rows in blocks of 32: with d_model=48, matrices read along d_model stay F16."""
    import gguf

    model = make_model(vocab_size=257, d_model=48, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    path = export_gguf(model, byte_level_tokenizer(), tmp_path / "m.gguf", "Q8_0")
    parity = gguf_parity(model, path)
    assert parity["shapes_match"] and parity["max_relative_error"] < 1e-2
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 48, of 64


def test_gguf_q_rows_follow_llama_cpp_interleaved_rotary():
    """Rotating the permuted projection in adjacent pairs equals permuting our rotate-half output."""
    n_heads, head_dim, d_model = 2, 8, 16
    weight, x = torch.randn(n_heads * head_dim, d_model), torch.randn(d_model)
    cos, sin = rope_tables(head_dim, 10, 10000.0)
    position = 7
    ours = apply_rope((weight @ x).view(n_heads, head_dim), cos[position], sin[position]).reshape(-1)
    permuted = (_llama_cpp_rotary_permute(weight, n_heads) @ x).view(n_heads, head_dim // 2, 2)
    angle = position / 10000.0 ** (torch.arange(0, head_dim, 2) / head_dim)  # (head_dim/2,)
    even, odd = permuted[..., 0], permuted[..., 1]
    interleaved = torch.stack((even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()), -1)
    expected = _llama_cpp_rotary_permute(ours[:, None], n_heads)[:, 0]
    torch.testing.assert_close(interleaved.reshape(-1), expected, atol=1e-5, rtol=1e-5)
    assert not math.isclose(float((ours - expected).abs().max()), 0.0)  # the permutation does move rows


def test_gguf_names_follow_llama_cpp(model_and_tokenizer):
    names = set(gguf_tensors(model_and_tokenizer[0]))
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd


def test_onnx_decoder_with_kv_cache_matches_torch(model_and_tokenizer, tmp_path):
    import onnx

    from tisslm.release.export import export_onnx, onnx_names, onnx_parity

    model, tokenizer = model_and_tokenizer
    export_onnx(model, tokenizer, tmp_path / "onnx")
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    inputs, outputs = onnx_names(2)
    assert [i.name for i in graph.input] == inputs and [o.name for o in graph.output] == outputs
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "onnx").iterdir()
    }
    dims = [d.dim_param or d.dim_value for d in graph.input[3].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and isinstance(dims[2], str) and dims[1] == 2  # batch, past: dynamic
    parity = onnx_parity(model, tmp_path / "onnx", tokenizer, "def f(x):\n    return x + 1\n", new_tokens=32)
    assert parity["max_abs_logit_diff"] < 1e-4
    assert parity["greedy_identical"] and parity["greedy_tokens"] == 32 and parity["greedy_rows"] == 3


@torch.no_grad()
def test_onnxruntime_genai_runs_the_onnx_export_with_tisslm_tokens_and_greedy_text(tmp_path):
    import onnxruntime_genai as og
    from runtimes import PROMPTS, bpe_tokenizer, code_model

    from tisslm.core.generate import generate
    from tisslm.release.export import export_onnx

    tokenizer = bpe_tokenizer()
    model = code_model(tokenizer)
    export_onnx(model, tokenizer, tmp_path / "onnx")
    genai_model = og.Model(str(tmp_path / "onnx"))
    genai_tokenizer = og.Tokenizer(genai_model)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt).ids
        assert list(genai_tokenizer.encode(prompt)) == ids
        assert genai_tokenizer.decode(ids) == prompt
        params = og.GeneratorParams(genai_model)
        params.set_search_options(max_length=len(ids) + 16, do_sample=False)
        generator = og.Generator(genai_model, params)
        generator.append_tokens(ids)
        theirs = []
        while not generator.is_done():
            generator.generate_next_token()
            theirs.append(int(generator.get_next_tokens()[0]))
        assert theirs == generate(model, [ids], 16, temperature=0)[0]


STAGE_WORK = """
import sys
from pathlib import Path

from tisslm.core.errors import run_main
from tisslm.core.generate import generate
from tisslm.core.model import ModelConfig, TissLM
from tisslm.core.tokenizer import byte_level_tokenizer
from tisslm.release.export import export_onnx
from tisslm.release.quantize import quantize_model


def main():
    model = TissLM(ModelConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64)).eval()
    generate(quantize_model(model, "int8_weight_only"), [[1, 2, 3]], 4, temperature=0, compile=True)
    export_onnx(model, byte_level_tokenizer(), Path(sys.argv[1]))
    print("done")


run_main(main)
"""


def test_the_work_of_the_quantize_and_export_stages_writes_nothing_to_stderr(tmp_path):
    """What the quantize stage (an int8 model's compiled decode) and the export stage (ONNX) do, run
    under the entry point every stage uses: torch's warnings about its own internals (Int8Tensor's
    cache hash, LeafSpec, shared axis names, torchvision's absent operators) filled the stage logs."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", STAGE_WORK, str(tmp_path / "onnx")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.endswith("done\n"), result.stderr
    assert result.stderr == ""
    assert (tmp_path / "onnx" / "model.onnx").is_file()

"""transformers 4.x loads the Hugging Face export as 5.x does, and optimum (which still requires
4.x) loads the ONNX export and generates TissLM's greedy text from a left-padded batch.

The 4.x side runs in .venv-transformers4 (`make test` builds it from constraints-transformers4.txt)
through tests/transformers4_probe.py; this side compares with TissLM itself.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from conftest import REPO
from runtimes import PROMPTS, bpe_tokenizer, code_model, end_of_text

from tisslm.core.generate import generate
from tisslm.release.export import export_hf, export_onnx

TRANSFORMERS4_PYTHON = REPO / ".venv-transformers4" / "bin" / "python"
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    assert TRANSFORMERS4_PYTHON.is_file(), f"{TRANSFORMERS4_PYTHON}: missing (`make test` builds it)"
    tokenizer = bpe_tokenizer()
    model = code_model(tokenizer)
    root = tmp_path_factory.mktemp("exports")
    export_hf(model, tokenizer, root / "hf")
    export_onnx(model, tokenizer, root / "onnx")
    command = [str(TRANSFORMERS4_PYTHON), str(REPO / "tests" / "transformers4_probe.py"),
               str(root / "hf"), str(root / "onnx"), str(NEW_TOKENS), *PROMPTS]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return model, tokenizer, json.loads(done.stdout.splitlines()[-1])


@torch.no_grad()
def test_transformers4_loads_the_hf_export_with_the_same_tokens_and_logits(probed):
    model, tokenizer, probe = probed
    assert probe["transformers"].startswith("4.")
    assert probe["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert probe["token_ids"] == [tokenizer.encode(p).ids for p in PROMPTS]
    assert probe["decoded"] == PROMPTS
    ours = model(torch.tensor([probe["token_ids"][0]]))[0]
    assert (torch.tensor(probe["logits"]) - ours).abs().max() < 1e-4  # rope_theta 500 read from config.json


@torch.no_grad()
def test_optimum_and_transformers4_generate_tisslm_greedy_text_from_a_left_padded_batch(probed):
    model, tokenizer, probe = probed
    end = end_of_text(tokenizer)
    ours = [
        generate(model, [tokenizer.encode(p).ids], NEW_TOKENS, temperature=0, stop_tokens=[end])[0] for p in PROMPTS
    ]
    assert len({len(tokenizer.encode(p).ids) for p in PROMPTS}) == len(PROMPTS)  # every row padded differently
    assert probe["optimum_generate"] == ours
    assert probe["hf_generate"] == ours

"""From a pretrained checkpoint to a registered assistant, as a user runs it (issue 25):
`tisslm import` of a local Hugging Face Llama, then `dvc repro` with `train.init_from` pointing at
it: continued pretraining, sft with LoRA adapters, dpo, evaluate (HumanEval in the sandbox),
export with its parity checks, and the registry. Tiny sizes; no figure of quality is asserted."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import copy_project

from tisslm.core.chat import DEFAULT_CHAT_TEMPLATE, TURN_END, TURN_START, ChatTemplate
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import END_OF_TEXT, byte_level_tokenizer

TINY_PARAMS = {
    "ingest": {"min_rows": 10},
    "clean": {"min_rows": 10, "workers": 1},
    "tokenize": {"val_fraction": 0.2},  # of 60 documents: enough held-out functions for sft and dpo
    "train": {"init_from": "models/pretrained", "max_steps": 4, "seq_len": 32, "batch_size": 4, "warmup_steps": 1,
              "eval_interval": 2, "eval_batches": 1, "log_interval": 2, "checkpoint_interval": 2, "nproc": 1,
              "precision": "fp32", "mlflow": False},
    "sft": {"steps": 3, "batch_size": 4, "seq_len": 384, "max_examples": 24, "eval_examples": 4,
            "lora": {"rank": 4, "alpha": 8.0}},
    "dpo": {"steps": 2, "batch_size": 2, "max_pairs": 4, "eval_pairs": 2, "max_new_tokens": 16},
    "evaluate": {"prompts": ["def "], "max_new_tokens": 8,
                 "humaneval": {"problems": 2, "samples": 2, "max_new_tokens": 16, "sft_examples": 2}},
    "bias": {"bootstrap": 20},
}  # fmt: skip
WORDS = ["value", "total", "count", "name", "items", "result", "index", "prefix", "limit", "scale"]


def documented_module(rng: random.Random, i: int) -> str:
    """A module of documented functions (the sft and dpo stages' default examples), one with a doctest."""
    functions = []
    for j in range(4):
        a, b = rng.sample(WORDS, 2)
        k = rng.randint(2, 99)
        doctest = f"\n\n    >>> {a}_{i}_{j}(1, 2)\n    {1 * k + 2}\n    " if j == 0 else ""
        functions.append(
            f"def {a}_{i}_{j}({a}, {b}):\n"
            f'    """Return the {a} times {k} plus the {b} of item {i}.{doctest}"""\n'
            f"    return {a} * {k} + {b}\n"
        )
    return f'"""Module {i}."""\nimport math\n\n\n' + "\n\n".join(functions)


def hf_checkpoint(directory: Path) -> None:
    """A tiny random Llama with a byte-level tokenizer holding the ChatML turn markers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=272, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, max_position_embeddings=512)  # fmt: skip
    LlamaForCausalLM(config).eval().save_pretrained(directory, safe_serialization=True)
    tokenizer = byte_level_tokenizer()
    tokenizer.add_special_tokens([TURN_START, TURN_END])
    tokenizer.save(str(directory / "tokenizer.json"))
    tokenizer_config = {"chat_template": DEFAULT_CHAT_TEMPLATE, "eos_token": TURN_END, "bos_token": END_OF_TEXT}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "ITERATIVE_DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_an_imported_model_runs_through_sft_lora_dpo_export_and_the_registry(tmp_path):
    project = copy_project(tmp_path / "project")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for i in range(60):
        (corpus / f"mod{i}.py").write_text(documented_module(rng, i))
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in TINY_PARAMS.items():
        params[section].update(values)
    params["ingest"]["sources"] = [{"type": "dir", "path": "../corpus", "include": ["**/*.py"]}]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert run(["git", "init", "-q"], project).returncode == 0
    hf_checkpoint(tmp_path / "hf")

    imported = run([sys.executable, "-m", "tisslm.cli", "import", "--from", str(tmp_path / "hf"),
                    "--out", "models/pretrained"], project)  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    repro = run([sys.executable, "-m", "dvc", "repro", "export", "register"], project)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]

    metrics = {name: json.loads((project / "metrics" / f"{name}.json").read_text())
               for name in ("tokenizer", "train", "sft", "dpo", "eval", "export", "register")}  # fmt: skip
    # The imported tokenizer and architecture carried through, the corpus's BPE never trained.
    assert metrics["tokenizer"]["source"] == "init_from"
    pretrained, final = (
        TissLM.from_pretrained(project / "models/pretrained"),
        TissLM.from_pretrained(project / "models/model"),
    )
    assert final.config == pretrained.config
    for stage_dir in ("models/base", "models/sft", "models/model"):
        assert (project / stage_dir / "tokenizer.json").read_bytes() == (tmp_path / "hf/tokenizer.json").read_bytes()
    assert ChatTemplate.load(project / "models/model").source == DEFAULT_CHAT_TEMPLATE
    # Continued pretraining, then LoRA fine-tuning: adapters saved in peft's format, merged into the weights.
    assert metrics["train"]["steps"] == 4
    adapter = project / "models/sft/adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not any(".lora" in key for key in TissLM.from_pretrained(project / "models/sft").state_dict())
    base, sft = (TissLM.from_pretrained(project / d).state_dict() for d in ("models/base", "models/sft"))
    assert any(not torch.equal(base[k], sft[k]) for k in base)  # the merged adapters changed the weights
    # Preference tuning ran on held-out pairs; HumanEval ran in the sandbox, whatever it scored.
    assert metrics["dpo"]["steps"] == 2
    humaneval = metrics["eval"]["humaneval"]
    assert humaneval["problems"] == 2 and 0.0 <= humaneval["pass@1"] <= 1.0
    # Exports still match the model (the stage fails otherwise), and the registry holds it.
    assert metrics["export"]["hf"]["max_abs_logit_diff"] <= params["export"]["logit_atol"]
    assert metrics["export"]["onnx"]["greedy_identical"]
    assert all(g["shapes_match"] for g in metrics["export"]["gguf"].values())
    assert metrics["register"]["promoted"] and metrics["register"]["challenger_version"] == "1"


@pytest.fixture(autouse=True)
def _mlflow_in_the_project(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the embedded default: sqlite in the project

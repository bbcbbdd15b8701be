"""lm-evaluation-harness against a real `tisslm serve`, as evaluation harnesses use the API.

`lm_eval --model local-completions` scores loglikelihoods through /v1/completions with `echo`,
`logprobs` and `max_tokens: 0`, its prompts sent as token ids by default (or as texts); its bits
per byte on local documents must match lm-eval's own `hf` backend on the Hugging Face export of
the same weights, and a multiple-choice task must run.
Both tasks are local YAML files over local JSON: nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from serving import ServerProcess, save_tiny_model

import tisslm.core.generate
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import load_tokenizer
from tisslm.release.export import export_hf

ROLLING_TASK = """task: tisslm_docs
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
"""
CHOICE_TASK = """task: tisslm_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
QUESTIONS = [
    {"question": "def add(a, b):\n    return a", "choices": [" + b", " - b", " * b"], "answer": 0},
    {"question": "import", "choices": [" os", " sys", " re"], "answer": 0},
    {"question": "for i in", "choices": [" range(3):", " [1, 2]:", " x:"], "answer": 0},
]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """The tiny model, its HF export, the two tasks, and a server of the model."""
    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = save_tiny_model(root / "model")
    export_hf(TissLM.from_pretrained(model_dir), load_tokenizer(model_dir), root / "hf")
    documents = [inspect.getsource(tisslm.core.generate)[:1500], textwrap.dedent(inspect.getsource(textwrap.dedent))]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tisslm_docs.yaml").write_text(ROLLING_TASK.format(docs=root / "docs.jsonl"))
    (tasks / "tisslm_choice.yaml").write_text(CHOICE_TASK.format(docs=root / "questions.jsonl"))
    server = ServerProcess(model_dir, "--max-prompt-tokens", "4000", workdir=root)
    yield root, server
    server.stop()


TASKS = ("tisslm_docs", "tisslm_choice")


def lm_eval(root: Path, model: str, model_args: str) -> dict:
    """Both tasks in one run of lm_eval (each run costs seconds of imports): task -> its results."""
    out = root / f"out-{model}-{hashlib.sha256(model_args.encode()).hexdigest()[:8]}"  # one per run
    command = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", ",".join(TASKS),
               "--include_path", str(root / "tasks"), "--output_path", str(out), "--batch_size", "1", "--device", "cpu"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    [found] = out.rglob("results*.json")
    return json.loads(found.read_text())["results"]


def served(root: Path, server: ServerProcess) -> str:
    """local-completions' arguments for the server: its defaults otherwise (tokenized requests: the
    prompts go as token ids, encoded by the model's tokenizer from the HF export)."""
    return f"base_url={server.url}/v1/completions,model=tisslm,tokenizer={root / 'hf'}"


@pytest.fixture(scope="module")
def hf_results(harness) -> dict:
    root, _ = harness
    return lm_eval(root, "hf", f"pretrained={root / 'hf'},dtype=float32")


@pytest.mark.parametrize("requests", ["token ids", "texts"])
def test_the_server_scores_both_tasks_as_the_hf_backend_does(harness, hf_results, requests):
    root, server = harness
    model_args = (
        served(root, server) + ",max_length=2048" + (",tokenized_requests=False" if requests == "texts" else "")
    )
    through_api = lm_eval(root, "local-completions", model_args)
    api_bpb, hf_bpb = (r["tisslm_docs"]["bits_per_byte,none"] for r in (through_api, hf_results))
    assert abs(api_bpb - hf_bpb) / hf_bpb < 0.005, (api_bpb, hf_bpb)
    # The multiple-choice task runs too, and the same choices win for the same weights.
    assert through_api["tisslm_choice"]["acc,none"] == hf_results["tisslm_choice"]["acc,none"]

"""`train.init_from`: continued pretraining of an imported model. The tokenizer stage copies its
tokenizer (and chat template) instead of training one, training starts from its weights with its
architecture, and a directory that is not a TissLM model is refused in one line (issue 25)."""

from __future__ import annotations

import hashlib
import json
import random
import sys

import pytest
import torch
import yaml
from conftest import REPO
from safetensors.torch import load_file

from tisslm.core.config import TokenizerParams, load_params
from tisslm.core.errors import TissLMError
from tisslm.core.model import TissLM, init_config
from tisslm.core.tokenizer import load_tokenizer, train_bpe
from tisslm.data.tokens import read_split, tokenize_corpus
from tisslm.release.hf import import_llama
from tisslm.train.trainer import Paths, Trainer, run_fingerprint

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
TRAIN = ["train.seq_len=32", "train.batch_size=4", "train.max_steps=3", "train.warmup_steps=1",
         "train.checkpoint_interval=3", "train.eval_interval=3", "train.eval_batches=1", "train.log_interval=1",
         "train.mlflow=false", "train.precision=fp32", "train.nproc=1", "train.device=cpu", "train.compile=false",
         "evaluate.batch_size=4"]  # fmt: skip


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A clean corpus in data/clean, and models/imported: a tiny Hugging Face Llama (with its own
    BPE tokenizer.json and a chat template) brought in by `tisslm import`."""
    import datasets
    from synthetic import code_doc
    from transformers import LlamaConfig, LlamaForCausalLM

    from tisslm.data.shards import doc_id, text_sha256, write_shards

    root = tmp_path_factory.mktemp("project")
    rng = random.Random(0)
    texts = ["\n".join(code_doc(rng, n_lines=30)) for _ in range(60)]
    ids = [doc_id("test", f"doc{i}.py") for i in range(len(texts))]
    table = {"id": ids, "source": ["test"] * len(texts), "path": [f"doc{i}.py" for i in range(len(texts))],
             "text": texts, "n_bytes": [len(t.encode()) for t in texts], "sha256": [text_sha256(t) for t in texts],
             "train_only": [False] * len(texts)}  # fmt: skip
    write_shards(datasets.Dataset.from_dict(table), root / "data" / "clean", 1000)

    hf = root / "hf"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(hf, safe_serialization=True)
    train_bpe(texts[:30], TokenizerParams(vocab_size=300), show_progress=False).save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    import_llama(hf, root / "models" / "imported")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["init_from"] = str(root / "models" / "imported")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def tokenizer_metrics(project) -> dict:
    """`python -m stages.tokenizer` as dvc.yaml runs it, in-process, in the project (its params.yaml
    sets train.init_from); its metrics."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO))
        patch.chdir(project)
        argv = ["stages.tokenizer", "--clean", "data/clean", "--tokenizer", "models/tokenizer",
                "--metrics", "metrics/tokenizer.json"]  # fmt: skip
        patch.setattr(sys, "argv", argv)
        from stages import tokenizer as stage

        stage.main()
    return json.loads((project / "metrics" / "tokenizer.json").read_text())


@pytest.fixture(scope="module")
def tokens(project, tokenizer_metrics):
    """The tokenizer stage's output tokenized, as the tokenize stage does."""
    tokenizer_dir = project / "models" / "tokenizer"
    split = read_split(project / "data" / "clean", 0.1)
    tokenize_corpus(split, load_tokenizer(tokenizer_dir), tokenizer_dir / "tokenizer.json",
                    project / "data" / "tokens", 0.1, 64, 0)  # fmt: skip
    return project / "data" / "tokens"


def run_paths(project, tokens, run) -> Paths:
    return Paths(tokens=tokens, tokenizer=project / "models" / "tokenizer", checkpoints=run / "checkpoints",
                 model=run / "model", metrics=run / "metrics.json")  # fmt: skip


def test_the_tokenizer_stage_copies_the_init_models_tokenizer_and_template(project, tokenizer_metrics):
    imported, metrics = project / "models" / "imported", tokenizer_metrics
    out = project / "models" / "tokenizer"
    assert (out / "tokenizer.json").read_bytes() == (imported / "tokenizer.json").read_bytes()
    assert (out / "chat_template.jinja").read_text() == TEMPLATE
    assert metrics["source"] == "init_from" and metrics["init_from"] == str(imported)
    assert metrics["init_weights_sha256"] == sha256(imported / "model.safetensors")
    assert metrics["vocab_size"] == load_tokenizer(imported).get_vocab_size() and metrics["val_bytes_per_token"] > 1


def test_training_starts_from_the_imported_weights_and_keeps_its_config(project, tokens, tmp_path, capsys):
    imported = project / "models" / "imported"
    params = load_params(None, [*TRAIN, f"train.init_from={imported}"])  # model: the defaults, not the import's
    trainer = Trainer(params, run_paths(project, tokens, tmp_path), None, None)
    assert "params.yaml's model: is ignored" in capsys.readouterr().out
    assert trainer.params.model == init_config(imported) != params.model
    start, saved = trainer.model.state_dict(), load_file(imported / "model.safetensors")
    assert set(start) == set(saved) and all(torch.equal(start[k], saved[k].float()) for k in saved)

    trainer.fit()
    metrics = trainer.finish()
    assert metrics["steps"] == 3
    model = TissLM.from_pretrained(tmp_path / "model")
    assert model.config == init_config(imported)
    assert not torch.equal(model.state_dict()["layers.0.attn.qkv.weight"], saved["layers.0.attn.qkv.weight"])
    assert (tmp_path / "model" / "tokenizer.json").read_bytes() == (imported / "tokenizer.json").read_bytes()
    assert (tmp_path / "model" / "chat_template.jinja").read_text() == TEMPLATE


def test_the_fingerprint_names_the_init_weights(project, tmp_path):
    """A checkpoint of a run from other weights (or none) is never resumed: the fingerprint holds
    the init model's weights, not only its path."""
    copy = tmp_path / "copy"
    import_llama(project / "hf", copy)
    base = load_params(None, TRAIN)
    with_init = run_fingerprint(load_params(None, [*TRAIN, f"train.init_from={copy}"]))
    assert with_init != run_fingerprint(base)
    weights = copy / "model.safetensors"
    state = load_file(weights)
    state["norm.weight"] = state["norm.weight"] + 1
    from safetensors.torch import save_file

    save_file(state, weights)
    assert run_fingerprint(load_params(None, [*TRAIN, f"train.init_from={copy}"])) != with_init


def test_tokens_of_another_tokenizer_or_too_long_a_context_are_refused(project, corpus, tokens, tmp_path):
    """Training an imported model on tokens of another tokenizer would be silently wrong."""
    imported = project / "models" / "imported"
    params = load_params(None, [*TRAIN, f"train.init_from={imported}"])
    with pytest.raises(TissLMError, match=r"its tokenizer did not make .*rerun the tokenizer and tokenize stages"):
        Trainer(params, run_paths(project, corpus / "tokens", tmp_path), None, None)
    params = load_params(None, [*TRAIN, "train.seq_len=128", f"train.init_from={imported}"])
    with pytest.raises(TissLMError, match=r"train\.seq_len=128 exceeds train\.init_from=.*'s max_seq_len=64"):
        Trainer(params, run_paths(project, tokens, tmp_path), None, None)


@pytest.mark.parametrize("which", ["missing", "hf"])
def test_an_init_from_that_is_not_a_tissllm_directory_is_refused_in_one_line(project, tmp_path, which):
    """A Hugging Face checkpoint has the same file names, but must be imported first."""
    directory = tmp_path / "nothing" if which == "missing" else project / "hf"
    with pytest.raises(TissLMError, match=r"train\.init_from=.*: not a TissLM model directory \(run `tisslm import"):
        init_config(directory)
    params = load_params(None, [*TRAIN, f"train.init_from={directory}"])
    with pytest.raises(TissLMError) as err:
        Trainer(params, run_paths(project, project / "data" / "tokens", tmp_path), None, None)
    assert "not a TissLM model directory" in str(err.value) and "\n" not in str(err.value)

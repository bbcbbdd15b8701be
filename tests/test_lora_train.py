"""LoRA as an option of train (single process): only adapters train, the model directory holds the
merged weights plus adapter/, and a run resumed from a LoRA checkpoint ends where a straight one does."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tisslm.core.config import load_params
from tisslm.core.errors import TissLMError
from tisslm.core.model import TissLM
from tisslm.train.lora import ADAPTER_DIR, load_with_adapter
from tisslm.train.trainer import Paths, train

TINY = [
    "model.vocab_size=320", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.d_ff=64", "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=4", "train.warmup_steps=2",
    "train.checkpoint_interval=4", "train.eval_interval=4", "train.eval_batches=1", "train.log_interval=2",
    "train.mlflow=false", "train.precision=fp32", "train.nproc=1", "train.device=cpu",
    "train.lora={rank: 4, alpha: 8.0}", "evaluate.batch_size=4",
]  # fmt: skip


def run(corpus, out, *overrides):
    params = load_params(None, [*TINY, *overrides])
    paths = Paths(corpus / "tokens", corpus / "tokenizer", out / "checkpoints", out / "model")
    return train(params, paths)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_lora_train_saves_merged_weights_and_the_adapter_and_resumes_exactly(corpus, tmp_path, optimizer):
    straight = tmp_path / "straight"
    run(corpus, straight, "train.max_steps=8", f"train.optimizer={optimizer}")
    model = TissLM.from_pretrained(straight / "model")  # merged: a plain TissLM
    checkpoint = load_file(straight / "checkpoints" / "step-8" / "model.safetensors")
    assert any(".lora_B." in k for k in checkpoint)  # checkpoints hold the adapters beside the frozen base
    params = load_params(None, TINY)
    torch.manual_seed(params.train.seed)
    initial = TissLM(params.model)  # the frozen base: the run's random init, as the trainer draws it
    assert torch.equal(checkpoint["layers.0.attn.qkv.base_layer.weight"], initial.layers[0].attn.qkv.weight)
    initial.save_pretrained(tmp_path / "base")
    again = load_with_adapter(tmp_path / "base", straight / "model" / ADAPTER_DIR)  # base + saved adapter
    x = torch.randint(0, 320, (1, 16))
    assert torch.allclose(again(x), model.eval()(x), atol=1e-5)
    assert not torch.allclose(initial.eval()(x), model(x), atol=1e-4)  # the adapters learned something

    resumed = tmp_path / "resumed"
    run(corpus, resumed, "train.max_steps=4", f"train.optimizer={optimizer}")
    run(corpus, resumed, "train.max_steps=8", f"train.optimizer={optimizer}")
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_int8_base_is_refused_by_train(corpus, tmp_path):
    with pytest.raises(TissLMError, match=r"train\.lora\.base=int8"):
        run(corpus, tmp_path, "train.max_steps=2", "train.lora={base: int8}")

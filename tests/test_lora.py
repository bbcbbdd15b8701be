"""LoRA adapters (tisslm.train.lora): exact at init, exact after merge, exact after a save/load
round trip, only the adapters train, and peft's own loader reads what we write."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model

from tisslm.core.config import LoraParams
from tisslm.core.errors import TissLMError
from tisslm.train.lora import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    adapter_state_dict,
    add_lora,
    load_adapter,
    merged,
    save_adapter,
)

P = LoraParams(rank=4, alpha=8.0)


def trained(model, seed: int = 1):
    """`model` with its adapters' B matrices drawn at random: a nonzero update, as after training."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    return model


@pytest.fixture
def idx():
    return torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bias", [False, True])
def test_fresh_adapter_is_the_base_exactly(idx, bias):
    base = make_model(attention_bias=bias)
    expected = base(idx)
    model = add_lora(make_model(attention_bias=bias), P)
    assert torch.equal(model(idx), expected)


def test_only_adapters_require_grad():
    model = add_lora(make_model(), P)
    trainable = [name for name, q in model.named_parameters() if q.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # every target of every block carries one A and one B
    assert len(trainable) == 2 * len(P.targets) * model.config.n_layers
    model.train()
    trained(model)
    model.loss(torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))).backward()
    assert all(q.grad is not None for q in model.parameters() if q.requires_grad)
    assert all(q.grad is None for q in model.parameters() if not q.requires_grad)


@pytest.mark.parametrize("bias", [False, True])
def test_merge_matches_adapter_model_with_original_keys(idx, bias):
    model = trained(add_lora(make_model(attention_bias=bias), P))
    plain = merged(model)
    assert set(plain.state_dict()) == set(make_model(attention_bias=bias).state_dict())
    assert plain.lm_head.weight is plain.tok_emb.weight  # still tied
    assert torch.allclose(plain(idx), model(idx), atol=1e-5, rtol=0)
    assert not torch.allclose(plain(idx), make_model(attention_bias=bias)(idx), atol=1e-3)  # the update counts


def test_save_load_round_trip_is_exact(tmp_path, idx):
    model = trained(add_lora(make_model(), P))
    save_adapter(model, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE}
    loaded = load_adapter(make_model(), tmp_path / "adapter")
    assert torch.equal(loaded(idx), model(idx))
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(loaded)[key], value)


def test_peft_reads_our_adapter(tmp_path, idx):
    from peft import PeftConfig, PeftModel

    model = trained(add_lora(make_model(), P))
    save_adapter(model, tmp_path)
    config = PeftConfig.from_pretrained(str(tmp_path))
    assert (config.peft_type, config.r, config.lora_alpha) == ("LORA", 4, 8.0)
    assert set(config.target_modules) == set(P.targets)
    peft_model = PeftModel.from_pretrained(make_model(), str(tmp_path))
    assert torch.allclose(peft_model(idx), model(idx), atol=1e-6, rtol=0)


def test_bad_adapter_is_one_line_error(tmp_path):
    save_adapter(trained(add_lora(make_model(), P)), tmp_path)
    with pytest.raises(TissLMError, match="do not match"):
        load_adapter(make_model(n_layers=3), tmp_path)
    (tmp_path / ADAPTER_CONFIG_FILE).write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(TissLMError, match="not a LoRA adapter"):
        load_adapter(make_model(), tmp_path)


def test_int8_base_trains_the_adapters_and_merges_exactly(idx):
    """QLoRA-style on a CPU: a torchao int8 base, float adapters; the gradients reach the adapters
    and the merge (dequantized base + update) computes what the adapted int8 model does."""
    model = add_lora(make_model(), LoraParams(rank=4, alpha=8.0, base="int8"))
    from torchao.quantization import Int8Tensor

    assert isinstance(model.layers[0].attn.qkv.get_base_layer().weight, Int8Tensor)
    model.train()
    model.loss(idx[:, :-1], idx[:, 1:]).backward()
    grads = [q.grad for n, q in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    trained(model)
    assert torch.allclose(merged(model)(idx), model(idx), atol=1e-5, rtol=0)


def test_served_adapter_changes_outputs(tmp_path, idx):
    """`tisslm serve/chat/generate --adapter DIR` load through `load_model`: base + adapter, merged."""
    from tisslm.serve.commands import load_model

    make_model().save_pretrained(tmp_path / "base")
    adapted = trained(add_lora(make_model(), P))
    save_adapter(adapted, tmp_path / "adapter")
    base, served = load_model(tmp_path / "base"), load_model(tmp_path / "base", tmp_path / "adapter")
    assert torch.allclose(served(idx), adapted(idx), atol=1e-5, rtol=0)
    assert not torch.equal(served(idx).argmax(-1), base(idx).argmax(-1))  # greedy tokens differ

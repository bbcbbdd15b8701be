"""save_pretrained / from_pretrained and the transformers Llama conversion."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model

from tisslm.core.errors import TissLMError
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import byte_level_tokenizer, load_tokenizer
from tisslm.release.hf import to_hf, to_llama_state_dict


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bitwise(tmp_path, tie, dtype):
    model = make_model(tie_embeddings=tie, dtype=dtype)
    model.save_pretrained(tmp_path / "m")
    loaded = TissLM.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert restored[key].dtype == dtype
        assert torch.equal(original[key], restored[key]), key
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == tie
    idx = torch.randint(0, 97, (2, 9))
    assert torch.equal(model(idx), loaded.eval()(idx))


def test_tokenizer_travels_with_the_model(tmp_path):
    make_model().save_pretrained(tmp_path / "m", tokenizer=byte_level_tokenizer())
    tokenizer = load_tokenizer(tmp_path / "m")
    text = "def f(x):\n    return 'héllo ✓'\n"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert tokenizer.get_vocab_size() == 257


def test_failed_save_keeps_the_previous_model(tmp_path, monkeypatch):
    model = make_model()
    model.save_pretrained(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("tisslm.core.model.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        make_model(seed=1).save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind


def test_corrupt_weights_give_one_line_error(tmp_path):
    make_model().save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(TissLMError, match=r"model\.safetensors: unreadable") as err:
        TissLM.from_pretrained(tmp_path / "m")
    assert "\n" not in str(err.value)


def test_invalid_config_json_names_file_and_key(tmp_path):
    make_model().save_pretrained(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["n_heads"] = 0
    config_path.write_text(json.dumps(config))
    with pytest.raises(TissLMError, match=r"config\.json: n_heads=0: Input should be greater than 0"):
        TissLM.from_pretrained(tmp_path / "m")
    config_path.write_text("{not json")
    with pytest.raises(TissLMError, match="not valid JSON"):
        TissLM.from_pretrained(tmp_path / "m")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    make_model().save_pretrained(tmp_path / "m")
    make_model(n_layers=3).save_pretrained(tmp_path / "other")
    (tmp_path / "m" / "config.json").write_bytes((tmp_path / "other" / "config.json").read_bytes())
    with pytest.raises(TissLMError, match="missing"):
        TissLM.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_transformers_llama_gives_the_same_logits(tie, n_kv_heads):
    model = make_model(tie_embeddings=tie, n_kv_heads=n_kv_heads)
    hf_model = to_hf(model)
    idx = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        theirs = hf_model(input_ids=idx).logits
    torch.testing.assert_close(theirs, model(idx), atol=1e-4, rtol=0)
    # Every Llama tensor comes from TissLM's weights (none left at its random init), split exactly.
    mapped = to_llama_state_dict(model)
    for key, value in hf_model.state_dict().items():
        assert torch.equal(value, mapped[key] if key in mapped else mapped["model.embed_tokens.weight"]), key
    assert sum(v.numel() for v in mapped.values()) == sum(p.numel() for p in model.parameters())


def test_outputs_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from tisslm.core.io import atomic_write_json

    mask = os.umask(0o022)
    try:
        make_model().save_pretrained(tmp_path / "m")
        atomic_write_json(tmp_path / "metrics.json", {"a": 1})
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644

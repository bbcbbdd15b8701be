"""DPO (tisslm.train.dpo): the loss against a hand computation, log-probs of padded batches, the
direction of one step, the frozen reference, the pairs (JSONL and sampled) and the stage's output."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_model

from tisslm.core.chat import TURN_END, TURN_START, ChatTemplate
from tisslm.core.config import DpoParams, Params
from tisslm.core.errors import TissLMError
from tisslm.core.model import CONFIG_FILE, WEIGHTS_FILE, TissLM
from tisslm.core.tokenizer import byte_level_tokenizer
from tisslm.data.instructions import FunctionExample
from tisslm.train.dpo import (
    EncodedPair,
    PreferencePair,
    collate,
    default_pairs,
    dpo_loss,
    encode_pair,
    frozen_copy,
    parses,
    preference_metrics,
    read_pairs,
    run_dpo,
    train_dpo,
)
from tisslm.train.sft import sequence_logprobs


def chat_tokenizer():
    tokenizer = byte_level_tokenizer()  # 256 bytes + <|endoftext|>
    tokenizer.add_special_tokens([TURN_START, TURN_END])
    return tokenizer


def chat_model(seed: int = 0) -> TissLM:
    return make_model(seed, vocab_size=chat_tokenizer().get_vocab_size(), max_seq_len=256)


def test_loss_and_rewards_match_a_hand_computation():
    policy_chosen, policy_rejected = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    reference_chosen, reference_rejected = torch.tensor([-11.0, -5.0]), torch.tensor([-11.5, -2.0])
    beta = 0.5
    loss, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
    # pair 0: chosen reward 0.5 * 1 = 0.5, rejected 0.5 * -0.5 = -0.25, margin 0.75
    # pair 1: chosen reward 0.5 * 1 = 0.5, rejected 0.5 * -1 = -0.5, margin 1.0
    expected = (math.log1p(math.exp(-0.75)) + math.log1p(math.exp(-1.0))) / 2  # -log sigmoid(m) = log(1 + e^-m)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, 0.5])
    assert rejected.tolist() == pytest.approx([-0.25, -0.5])


def test_padded_batch_logprobs_equal_each_sequence_alone():
    model = make_model()
    generator = torch.Generator().manual_seed(0)
    pairs = []
    for length in (7, 19, 12):
        ids = torch.randint(0, 97, (2, length), generator=generator)
        masks = torch.rand(2, length, generator=generator) > 0.4
        pairs.append(EncodedPair(ids[0].tolist(), masks[0].tolist(), ids[1].tolist(), masks[1].tolist()))
    ids, mask = collate(pairs, torch.device("cpu"))
    assert ids.shape == (6, 19)
    with torch.no_grad():
        batched = sequence_logprobs(model, ids, mask)
        alone = [
            sequence_logprobs(model, torch.tensor([tokens]), torch.tensor([answer]))[0]
            for tokens, answer in [(p.chosen_ids, p.chosen_mask) for p in pairs]
            + [(p.rejected_ids, p.rejected_mask) for p in pairs]
        ]
    torch.testing.assert_close(batched, torch.stack(alone), atol=1e-5, rtol=0)


def test_one_step_raises_the_margin_of_the_pair_trained_on_and_the_reference_stays_frozen():
    policy = make_model()
    reference = frozen_copy(policy)
    before_weights = {name: param.clone() for name, param in reference.named_parameters()}
    prompt = list(range(10, 20))
    pair = EncodedPair(
        [*prompt, 30, 31, 32, 33], [False] * 10 + [True] * 4, [*prompt, 60, 61, 62], [False] * 10 + [True] * 3
    )
    params = DpoParams(steps=1, batch_size=1, lr=1e-3, beta=0.1)
    before = preference_metrics(policy, reference, [pair], params.beta, 1, "fp32")
    metrics = train_dpo(policy, reference, [pair], [pair], params)
    assert before["reward_margin"] == 0.0  # the policy starts as the reference
    assert metrics["heldout_after"]["reward_margin"] > before["reward_margin"]
    assert metrics["heldout_before"] == before
    assert all(param.grad is None for param in reference.parameters())
    for name, param in reference.named_parameters():
        assert torch.equal(param, before_weights[name]), name
    assert any(not torch.equal(p, r) for p, r in zip(policy.parameters(), reference.parameters(), strict=True))


def test_the_answer_mask_covers_the_last_assistant_turn_and_its_end_marker():
    tokenizer, template = chat_tokenizer(), ChatTemplate()
    prompt = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "earlier answer"},
        {"role": "user", "content": "and now?"},
    ]
    encoded = encode_pair(template, tokenizer, PreferencePair(prompt, "good", "bad!"))
    for ids, mask, answer in [
        (encoded.chosen_ids, encoded.chosen_mask, "good"),
        (encoded.rejected_ids, encoded.rejected_mask, "bad!"),
    ]:
        masked = [token for token, keep in zip(ids, mask, strict=True) if keep]
        # the default template's turn: the answer, <|im_end|> and its newline, as SFT's mask has it
        assert tokenizer.decode(masked, skip_special_tokens=False) == answer + TURN_END + "\n"
        prompt_part = ids[: mask.index(True)]
        assert prompt_part == template.prompt_ids(tokenizer, prompt)


def test_parses_compiles_without_running():
    assert parses("def f(x):\n    return x + 1\n")
    assert not parses("def f(x:\n    return x\n")
    assert not parses("return 1\n")  # compile's checks, beyond the grammar
    assert not parses("x = 1\x00")
    assert parses("raise SystemExit(1)\n")  # compiled, never run


def test_read_pairs_takes_strings_or_messages_and_names_bad_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add"}]
    path.write_text(
        json.dumps({"prompt": "square x", "chosen": "x * x", "rejected": "x +"})
        + "\n\n"
        + json.dumps({"prompt": messages, "chosen": "a + b", "rejected": "a -"})
        + "\n"
    )
    pairs = read_pairs(path)
    assert pairs[0] == PreferencePair([{"role": "user", "content": "square x"}], "x * x", "x +")
    assert pairs[1].prompt == messages
    for line, error in [
        ("{", "invalid JSON"),
        (json.dumps({"prompt": "p", "chosen": "c"}), '"prompt", "chosen" and "rejected" only'),
        (json.dumps({"prompt": "p", "chosen": "c", "rejected": 3}), "rejected must be a string"),
        (json.dumps({"prompt": [{"role": "bot", "content": "x"}], "chosen": "c", "rejected": "r"}), "role"),
        (json.dumps({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "c", "rejected": "r"}), "ends"),
    ]:
        path.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n" + line + "\n")
        with pytest.raises(TissLMError, match=f"^{path}:2: .*{error}"):
            read_pairs(path)


def example(i: int) -> FunctionExample:
    solution = f"def f{i}(x):\n    return x + {i}"
    return FunctionExample(f"doc{i}", f"f{i}", f"Write a Python function `f{i}(x)`: add {i}", solution, "", None)


def test_default_pairs_keep_the_samples_that_fail_to_parse():
    tokenizer, template = chat_tokenizer(), ChatTemplate()
    model = chat_model()
    examples = [example(i) for i in range(6)]
    found = default_pairs(model, tokenizer, template, examples, 4, 24, 1.0, seed=0)
    assert found.sampled == 6  # one batch: every example sampled, the pairs capped
    assert len(found.pairs) == min(4, found.failed_to_parse)
    for pair in found.pairs:
        solution = next(e.solution for e in examples if e.messages[:1] == pair.prompt)
        assert pair.chosen == solution and not parses(pair.rejected)
    again = default_pairs(model, tokenizer, template, examples, 4, 24, 1.0, seed=0)
    assert again.pairs == found.pairs  # seeded
    assert default_pairs(model, tokenizer, template, examples, 0, 24, 1.0, seed=0).sampled == 0


def test_stage_trains_from_jsonl_and_passes_the_model_through_at_zero_steps(tmp_path):
    tokenizer = chat_tokenizer()
    sft = tmp_path / "sft"
    chat_model().save_pretrained(sft, tokenizer)
    ChatTemplate().save(sft)
    (sft / "adapter").mkdir()
    (sft / "adapter" / "note").write_text("the sft adapter")
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"write f{i}", "chosen": f"def f{i}(): pass", "rejected": f"def f{i}(:"}) + "\n"
            for i in range(12)
        )
    )
    params = Params(dpo=DpoParams(data=data, steps=2, batch_size=4, eval_pairs=8), tokenize={"val_fraction": 0.3})
    metrics = run_dpo(params, tmp_path / "no-clean", sft, tmp_path / "model")
    assert metrics["pairs"]["train"] + metrics["pairs"]["heldout"] == 12 and metrics["pairs"]["heldout"] > 0
    assert metrics["sampled"] is None and metrics["steps"] == 2
    assert set(metrics["heldout_after"]) >= {"reward_accuracy", "reward_margin"}
    out = tmp_path / "model"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [CONFIG_FILE, WEIGHTS_FILE, "tokenizer.json", "chat_template.jinja"]
    )
    assert (out / WEIGHTS_FILE).read_bytes() != (sft / WEIGHTS_FILE).read_bytes()
    TissLM.from_pretrained(out)

    passed = run_dpo(Params(dpo=DpoParams(steps=0)), tmp_path / "no-clean", sft, tmp_path / "copy")
    assert passed["steps"] == 0
    for name in (WEIGHTS_FILE, "chat_template.jinja", "adapter/note"):
        assert (tmp_path / "copy" / name).read_bytes() == (sft / name).read_bytes()


def test_lora_trains_the_adapters_alone_and_saves_them_beside_the_merged_weights(tmp_path):
    from tisslm.core.config import LoraParams
    from tisslm.train.lora import ADAPTER_CONFIG_FILE, ADAPTER_DIR, load_with_adapter

    sft = tmp_path / "sft"
    chat_model().save_pretrained(sft, chat_tokenizer())
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"f{i}", "chosen": "pass", "rejected": "pass("}) + "\n" for i in range(4))
    )
    lora = LoraParams(rank=2, alpha=4.0)
    params = Params(dpo=DpoParams(data=data, steps=2, batch_size=2, lr=1e-2, eval_pairs=0, lora=lora))
    run_dpo(params, tmp_path / "no-clean", sft, tmp_path / "model")
    out = tmp_path / "model"
    assert (out / ADAPTER_DIR / ADAPTER_CONFIG_FILE).is_file()
    tuned, base = TissLM.from_pretrained(out), TissLM.from_pretrained(sft)
    ids = torch.tensor([chat_tokenizer().encode("pass(").ids])
    with torch.no_grad():
        assert not torch.equal(tuned(ids), base(ids))  # the merged adapters changed the model
        torch.testing.assert_close(tuned(ids), load_with_adapter(sft, out / ADAPTER_DIR)(ids), atol=1e-5, rtol=0)
    assert torch.equal(tuned.tok_emb.weight, base.tok_emb.weight)  # not a target: frozen

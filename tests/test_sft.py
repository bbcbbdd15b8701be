"""Supervised fine-tuning (tisslm.train.sft): packing keeps every token in place, the loss is
the cross-entropy over the assistant's tokens only, and a tiny run is deterministic."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from tokenizers import AddedToken

from tisslm.core.chat import ChatTemplate
from tisslm.core.config import LoraParams, SftParams
from tisslm.core.tokenizer import END_OF_TEXT, byte_level_tokenizer
from tisslm.train.sft import (
    IGNORE,
    finetune,
    heldout_loss,
    pack,
    pack_conversations,
    sequence_logprobs,
    sft_conversations,
)

SEP, PAD = 90, 91


def chat_tokenizer():
    tokenizer = byte_level_tokenizer()  # 256 bytes, then <|endoftext|>
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<|pad|>", "<|im_start|>", "<|im_end|>")])
    return tokenizer


def conversations(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"add {i} and {i + 1}"}, {"role": "assistant", "content": f"{2 * i + 1}"}]
            for i in range(n)]  # fmt: skip


def test_packing_keeps_every_token_with_its_mask_and_never_splits_a_conversation():
    examples = [([1] * 5, [False, False, True, True, False]), ([2] * 7, [False] * 3 + [True] * 4),
                ([3] * 3, [False, True, False]), ([4] * 20, [False] * 19 + [True]), ([5] * 20, [True] + [False] * 19),
                ([6] * 4, [False] * 4)]  # fmt: skip
    packed = pack(examples, seq_len=11, separator=SEP, pad=PAD)  # rows of 12 tokens
    assert packed.tokens.shape[1] == 12
    # the 20-token ones are cut to 12; the one whose only assistant token is past the cut is dropped
    assert (packed.conversations, packed.truncated, packed.dropped) == (5, 1, 1)
    rows = [list(zip(r.tolist(), m.tolist(), strict=True)) for r, m in zip(packed.tokens, packed.mask, strict=True)]
    stream = [pair for row in rows for pair in row if pair[0] != PAD]  # padding only ever ends a row
    expected = []
    for ids, mask in [examples[0], examples[1], examples[2]]:
        expected += [*zip(ids, mask, strict=True), (SEP, False)]
    expected += list(zip(examples[4][0], examples[4][1], strict=True))[:12]  # a whole row, no separator
    expected += [*zip(*examples[5], strict=True), (SEP, False)]
    assert stream == expected  # nothing lost, reordered or misaligned
    for row in rows:  # a conversation (a run of one token id) sits in one row
        assert all(t == PAD for t, _ in row[[t for t, _ in row].index(PAD) :]) if PAD in [t for t, _ in row] else True
    firsts = [{t for t, _ in row if t not in (SEP, PAD)} for row in rows]
    assert all(not (a & b) for i, a in enumerate(firsts) for b in firsts[i + 1 :])
    assert not packed.mask[packed.tokens == PAD].any() and not packed.mask[packed.tokens == SEP].any()
    x, y = packed.inputs_targets(slice(None))
    assert torch.equal(x, packed.tokens[:, :-1])
    assert torch.equal(y[packed.mask[:, 1:]], packed.tokens[:, 1:][packed.mask[:, 1:]])
    assert (y[~packed.mask[:, 1:]] == IGNORE).all()


def test_template_packing_masks_exactly_the_assistant_tokens():
    tokenizer, template = chat_tokenizer(), ChatTemplate()
    chats = conversations(3)
    packed = pack_conversations(template, tokenizer, chats, seq_len=63)
    assert packed.conversations == 3 and not packed.truncated
    answers = tokenizer.decode(packed.tokens[packed.mask].tolist(), skip_special_tokens=False)  # in row order
    assert answers == "".join(f"{c[1]['content']}<|im_end|>\n" for c in chats)  # each answer, its end of turn
    assert (packed.tokens == tokenizer.token_to_id(END_OF_TEXT)).sum() == 3


def test_masked_loss_is_cross_entropy_over_assistant_positions_only():
    tokenizer = chat_tokenizer()
    model = make_model(vocab_size=300)
    packed = pack_conversations(ChatTemplate(), tokenizer, conversations(6), seq_len=63)
    x, y = packed.inputs_targets(slice(None))
    logits = model(x)  # (B, T, vocab)
    where = packed.mask[:, 1:]
    reference = F.cross_entropy(logits[where], packed.tokens[:, 1:][where])  # by hand: assistant targets only
    assert torch.allclose(model.loss(x, y), reference, atol=1e-5)
    assert heldout_loss(model, packed, batch_size=1) == pytest.approx(reference.item(), abs=1e-5)
    # sequence_logprobs: per row, the sum of the same targets' log-probabilities
    log_probs = torch.log_softmax(logits, -1).gather(-1, packed.tokens[:, 1:, None]).squeeze(-1)
    expected = (log_probs * where).sum(-1)
    assert torch.allclose(sequence_logprobs(model, packed.tokens, packed.mask), expected, atol=1e-5)
    assert torch.allclose(-expected.sum() / where.sum(), reference, atol=1e-5)


@pytest.mark.parametrize("lora", [None, LoraParams(rank=4, alpha=8.0)])
def test_tiny_run_is_deterministic_and_learns(lora):
    tokenizer = chat_tokenizer()
    train = pack_conversations(ChatTemplate(), tokenizer, conversations(40), seq_len=63)
    held = pack_conversations(ChatTemplate(), tokenizer, conversations(48)[40:], seq_len=63)
    p = SftParams(steps=12, batch_size=4, seq_len=63, lr=3e-3, warmup_steps=2, eval_interval=6, precision="fp32",
                  lora=lora)  # fmt: skip

    def run():
        from tisslm.train.lora import add_lora

        torch.manual_seed(p.seed)
        model = make_model(vocab_size=300).train()
        if lora:
            add_lora(model, lora)
        return model, finetune(model, train, held, p)

    (a, ra), (b, rb) = run(), run()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert ra["heldout_loss_after"] == rb["heldout_loss_after"]
    assert [h["step"] for h in ra["history"]] == [6, 12]
    assert ra["tokens_seen"] == 12 * 4 * 63 and ra["assistant_tokens_seen"] > 0
    assert ra["heldout_loss_after"] != ra["heldout_loss_before"]


def test_jsonl_conversations_hold_out_a_seeded_draw(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations(10)))
    p = SftParams(data=path, eval_examples=3, seed=5)
    train, held = sft_conversations(tmp_path / "no-clean", 0.05, p)
    assert len(train) == 7 and len(held) == 3
    assert sorted(map(str, train + held)) == sorted(map(str, conversations(10)))
    assert sft_conversations(tmp_path / "no-clean", 0.05, p) == (train, held)
    assert len(sft_conversations(tmp_path, 0.05, p.model_copy(update={"max_examples": 2}))[0]) == 2


def test_stage_writes_a_loadable_model_with_its_template_and_adapter(tmp_path):
    from test_instructions import DOCUMENT, write_clean

    from tisslm.core.chat import CHAT_TEMPLATE_FILE
    from tisslm.core.config import Params
    from tisslm.core.model import TissLM
    from tisslm.train.lora import ADAPTER_DIR, load_with_adapter
    from tisslm.train.sft import run_sft

    ids = [f"doc-{i}" for i in range(12)]
    texts = [DOCUMENT.replace("hypotenuse", f"hypotenuse_{i}").replace("join", f"join_{i}") for i in range(12)]
    write_clean(tmp_path / "clean", ids, texts, [False] * 12)
    make_model(vocab_size=300, max_seq_len=128).save_pretrained(tmp_path / "base", tokenizer=chat_tokenizer())
    sft = SftParams(steps=3, batch_size=2, seq_len=127, eval_interval=2, eval_examples=4, precision="fp32",
                    lora=LoraParams(rank=2))  # fmt: skip
    params = Params(sft=sft).model_copy(update={"tokenize": Params().tokenize.model_copy(update={"val_fraction": 0.3})})
    metrics = run_sft(params, tmp_path / "clean", tmp_path / "base", tmp_path / "sft")
    assert metrics["steps"] == 3 and metrics["examples_train"] and metrics["examples_heldout"]
    assert metrics["trainable_parameters"] < make_model(vocab_size=300).num_parameters()
    json.dumps(metrics)  # the metrics file's content
    model = TissLM.from_pretrained(tmp_path / "sft")  # merged: a plain TissLM
    assert (tmp_path / "sft" / CHAT_TEMPLATE_FILE).read_text() == ChatTemplate().source
    again = load_with_adapter(tmp_path / "base", tmp_path / "sft" / ADAPTER_DIR)  # base + adapter = the merge
    x = torch.randint(0, 300, (1, 16))
    assert torch.allclose(model(x), again(x), atol=1e-5)
    assert run_sft(params.model_copy(update={"sft": sft.model_copy(update={"steps": 0})}), tmp_path / "clean",
                   tmp_path / "base", tmp_path / "copy") == {"steps": 0, "copied_from": str(tmp_path / "base")}  # fmt: skip
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (
        tmp_path / "base" / "model.safetensors"
    ).read_bytes()

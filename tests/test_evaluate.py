"""Evaluation: lm-evaluation-harness's rolling log-likelihood and bits per byte, and baselines."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import make_model

from tisslm.core.tokenizer import END_OF_TEXT, byte_level_tokenizer
from tisslm.eval.compression import bits_per_byte
from tisslm.eval.evaluate import document_loglikelihoods, evaluate_texts, perplexity_metrics, rolling_windows


def test_rolling_windows_predict_every_token_once_in_order():
    tokens = list(range(10, 33))
    windows = rolling_windows(tokens, prefix=0, max_len=8)
    assert [t for _, targets in windows for t in targets] == tokens
    for inputs, targets in windows:
        assert len(inputs) <= 8 and inputs[: len(targets)][1:] == targets[: len(targets) - 1]
    assert windows[0][0][0] == 0 and windows[1][0][0] == tokens[7]  # each window sees the token before it


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_per_token():
    """A model whose logits are all zero gives every token probability 1/V: hand-computable."""
    model = make_model(tie_embeddings=False, vocab_size=257)  # the byte tokenizer's 257 ids
    with torch.no_grad():
        model.lm_head.weight.zero_()
    tokenizer = byte_level_tokenizer()  # one token per byte, so tokens == bytes
    texts = ["def f(x):\n    return x\n", "héllo wörld ✓"]
    metrics = evaluate_texts(model, tokenizer, texts, END_OF_TEXT, window=16)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert metrics["tokens"] == metrics["bytes"] == n_bytes
    assert metrics["bits_per_byte"] == pytest.approx(math.log2(257), rel=1e-6)
    assert metrics["byte_perplexity"] == pytest.approx(257, rel=1e-5)
    assert metrics["word_perplexity"] == pytest.approx(257 ** (n_bytes / metrics["words"]), rel=1e-5)


def test_short_documents_score_as_one_full_context_pass():
    model = make_model()
    rng = random.Random(0)
    documents = [[rng.randrange(1, 97) for _ in range(n)] for n in (5, 17, 30)]
    scored = document_loglikelihoods(model, documents, prefix=0, max_len=32, batch_size=2)
    for doc, total in zip(documents, scored, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([[0, *doc[:-1]]]))[0]
        expected = logits.log_softmax(-1)[torch.arange(len(doc)), torch.tensor(doc)].sum().item()
        assert total == pytest.approx(expected, abs=1e-4)


def test_perplexity_metrics_formulas():
    metrics = perplexity_metrics([-10.0, -20.0], n_tokens=6, n_bytes=7, n_words=3)
    assert metrics["bits_per_byte"] == pytest.approx(30 / 7 / math.log(2))
    assert metrics["loss_per_token"] == pytest.approx(5.0)
    assert metrics["word_perplexity"] == pytest.approx(math.exp(30 / 3))
    assert "word_perplexity" not in perplexity_metrics([-10.0], n_tokens=6, n_bytes=7)


def test_compressor_baselines_are_cheaper_with_context():
    text = ("def handler(request):\n    return respond(request.items, status=200)\n" * 40).encode()
    assert bits_per_byte("xz_9e", text, context=text) < bits_per_byte("xz_9e", text) < 8
    assert {round(bits_per_byte(name, text), 3) > 0 for name in ("gzip_9", "bz2_9", "xz_9e")} == {True}

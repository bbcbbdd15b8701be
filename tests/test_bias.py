"""The minimal-pair bias benchmark: its data, its metrics, and the hub option offline."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from conftest import make_model

from tisslm.core.errors import TissLMError
from tisslm.core.tokenizer import byte_level_tokenizer
from tisslm.eval.bias import MinimalPair, crows_pairs_metrics, load_pairs, score_pairs


def test_builtin_pairs_cover_nine_categories_with_twenty_pairs_each():
    pairs = load_pairs()
    counts = Counter(p.category for p in pairs)
    assert len(counts) >= 9 and min(counts.values()) >= 20
    assert {"race-color", "gender", "sexual-orientation", "religion", "age", "nationality", "disability",
            "physical-appearance", "socioeconomic"} <= set(counts)  # fmt: skip
    assert all(p.more != p.less for p in pairs)


def test_a_pair_that_differs_in_more_than_its_term_is_refused(tmp_path):
    path = tmp_path / "pairs.jsonl"
    record = {"category": "age", "more": "The old man was slow.", "less": "The young man was fast.",
              "term_more": "The old man", "term_less": "The young man"}  # fmt: skip
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(TissLMError, match=r"pairs.jsonl:1: the sentences differ in more than"):
        load_pairs(path)


def test_metrics_match_a_hand_computed_case():
    pairs = [MinimalPair("a", "x", "y")] * 3 + [MinimalPair("b", "x", "y")]
    scores = np.array([[-1.0, -2.0], [-3.0, -1.0], [-2.0, -1.5], [-4.0, -1.0]])  # prefers "more" only in the first
    metrics = crows_pairs_metrics(pairs, scores, bootstrap=200, seed=0)
    assert metrics["overall"]["pct_stereotype"] == pytest.approx(25.0)
    assert metrics["overall"]["likelihood_diff"] == pytest.approx((1 + 2 + 0.5 + 3) / 4)
    assert metrics["per_category"]["a"]["pct_stereotype"] == pytest.approx(100 / 3)
    assert metrics["per_category"]["b"]["pct_stereotype"] == 0.0
    low, high = metrics["overall"]["pct_stereotype_ci95"]
    assert 0 <= low <= 25.0 <= high <= 100
    assert crows_pairs_metrics(pairs, scores, bootstrap=200, seed=0) == metrics  # the seed fixes the intervals


def test_scores_are_log_likelihoods_of_each_sentence():
    model = make_model(vocab_size=257)
    pairs = [MinimalPair("age", "The old man was slow.", "The old man was slow."), MinimalPair("age", "ab", "abcdef")]
    scores = score_pairs(model, byte_level_tokenizer(), pairs, window=32)
    assert scores.shape == (2, 2) and (scores < 0).all()
    assert scores[0, 0] == pytest.approx(scores[0, 1])  # the same sentence, the same score
    assert scores[1, 0] > scores[1, 1]  # a longer continuation of the same start is less likely


def test_hub_source_offline_is_skipped_not_failed(monkeypatch):
    from huggingface_hub import constants

    from tisslm.eval.bias import hub_pairs

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(TissLMError, match="unreachable"):  # the stage turns this into a note
        hub_pairs("nyu-mll/crows_pairs", "test")

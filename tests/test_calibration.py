"""Calibration of next-token predictions: ECE, MCE and Brier by hand and on synthetic predictors, and
the evaluate stage's calibration figures and plot files."""

from __future__ import annotations

import csv
import json
import os
import subprocess

import datasets
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO, make_model, stage_command

from tisslm.core.tokenizer import END_OF_TEXT, byte_level_tokenizer
from tisslm.data.shards import COLUMNS, doc_id, text_sha256, write_shards
from tisslm.eval.calibration import CSV_COLUMNS, Calibration
from tisslm.eval.evaluate import evaluate_texts


def peaked(confidence: torch.Tensor, vocab: int) -> torch.Tensor:
    """Distributions whose top-1 is token 0 with probability `confidence`, the rest spread evenly."""
    confidence = confidence.double()  # (N,)
    probs = ((1 - confidence) / (vocab - 1))[:, None].repeat(1, vocab)  # (N, V)
    probs[:, 0] = confidence
    return probs


def synthetic(accuracy_of, n: int = 200_000, vocab: int = 10, seed: int = 0) -> Calibration:
    """A predictor whose confidence is uniform on [0.2, 1] and whose top-1 is right with probability
    `accuracy_of(confidence)`, fed in batches."""
    generator = torch.Generator().manual_seed(seed)
    confidence = 0.2 + 0.8 * torch.rand(n, generator=generator, dtype=torch.float64)  # (N,)
    right = torch.rand(n, generator=generator, dtype=torch.float64) < accuracy_of(confidence)  # (N,)
    wrong_token = torch.randint(1, vocab, (n,), generator=generator)  # (N,)
    targets = torch.where(right, 0, wrong_token)  # (N,)
    calibration = Calibration(bins=15)
    for probs, target in zip(peaked(confidence, vocab).split(10_000), targets.split(10_000), strict=True):
        calibration.update(probs.log(), target)
    return calibration


def test_ece_mce_and_brier_of_a_hand_computed_example():
    confidence = torch.tensor([0.3, 0.4, 0.6, 0.9, 0.8, 0.95])
    targets = torch.tensor([0, 2, 0, 0, 1, 0])  # token 0 is every top-1: right, wrong, right, right, wrong, right
    calibration = Calibration(bins=4)
    calibration.update(peaked(confidence, vocab=4).log(), targets)

    # Bins (0.25, 0.5]: {0.3 right, 0.4 wrong}; (0.5, 0.75]: {0.6 right}; (0.75, 1]: {0.9, 0.8 wrong, 0.95}.
    table = calibration.table()
    assert [row["count"] for row in table] == [0, 2, 1, 3]
    assert table[0]["accuracy"] is None and table[0]["confidence"] is None
    assert [row["accuracy"] for row in table[1:]] == pytest.approx([1 / 2, 1, 2 / 3])
    assert [row["confidence"] for row in table[1:]] == pytest.approx([0.35, 0.6, 2.65 / 3])
    assert (table[3]["bin_lower"], table[3]["bin_upper"]) == (0.75, 1.0)
    metrics = calibration.metrics()
    gaps = [0.15, 0.4, 2.65 / 3 - 2 / 3]
    assert metrics["ece"] == pytest.approx((2 * gaps[0] + 1 * gaps[1] + 3 * gaps[2]) / 6)  # 0.225
    assert metrics["mce"] == pytest.approx(0.4)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["mean_confidence"] == pytest.approx(3.95 / 6)
    # Right: (1-c)^2 + 3((1-c)/3)^2. Wrong: c^2 + (1-q)^2 + 2q^2, with q = (1-c)/3 the target's probability.
    right = sum(4 / 3 * (1 - c) ** 2 for c in (0.3, 0.6, 0.9, 0.95))
    wrong = sum(c**2 + (1 - (1 - c) / 3) ** 2 + 2 * ((1 - c) / 3) ** 2 for c in (0.4, 0.8))
    assert metrics["brier"] == pytest.approx((right + wrong) / 6)
    assert (metrics["bins"], metrics["tokens"]) == (4, 6)


def test_a_confidence_on_an_edge_falls_in_the_bin_it_closes():
    """Guo et al.'s bins are (a, b]: exactly 0.5 belongs to (0.25, 0.5], exactly 1 to the last bin."""
    logits = torch.tensor([[0.0, 0.0], [0.0, -torch.inf]], dtype=torch.float64)  # (2, 2): p = (1/2, 1/2), (1, 0)
    calibration = Calibration(bins=4)
    calibration.update(logits, torch.tensor([0, 0]))
    assert [row["count"] for row in calibration.table()] == [0, 1, 0, 1]


def test_a_calibrated_predictor_has_ece_near_zero():
    metrics = synthetic(lambda confidence: confidence).metrics()
    assert metrics["ece"] < 0.01
    assert metrics["mce"] < 0.05
    assert metrics["accuracy"] == pytest.approx(0.6, abs=0.01)  # the mean confidence on [0.2, 1]


def test_an_overconfident_predictor_has_a_large_ece():
    metrics = synthetic(lambda confidence: confidence**2).metrics()
    # E[c - c^2] for c uniform on [0.2, 1] is 0.6 - 0.992/2.4 = 0.187; every bin is overconfident,
    # so the ECE is exactly the overall gap between confidence and accuracy.
    assert metrics["ece"] == pytest.approx(0.187, abs=0.01)
    assert metrics["ece"] == pytest.approx(metrics["mean_confidence"] - metrics["accuracy"], abs=1e-9)
    assert metrics["mce"] > 0.2


def test_brier_equals_the_one_hot_computation():
    generator = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(257, 50, generator=generator, dtype=torch.float64)  # (N, V)
    targets = torch.randint(0, 50, (257,), generator=generator)  # (N,)
    calibration = Calibration()
    calibration.update(logits, targets)
    one_hot = F.one_hot(targets, 50).double()  # (N, V)
    expected = (logits.softmax(-1) - one_hot).square().sum(-1).mean().item()
    assert calibration.metrics()["brier"] == pytest.approx(expected, abs=1e-6)


def test_streaming_over_batches_equals_one_shot_and_bins_sum_to_the_tokens():
    generator = torch.Generator().manual_seed(2)
    logits = 4 * torch.randn(1000, 30, generator=generator)  # (N, V) fp32, as the evaluator gives them
    targets = torch.randint(0, 30, (1000,), generator=generator)  # (N,)
    whole, batched = Calibration(bins=10), Calibration(bins=10)
    whole.update(logits, targets)
    for rows in torch.arange(1000).split([1, 7, 100, 392, 500]):
        batched.update(logits[rows], targets[rows])
    assert batched.metrics() == pytest.approx(whole.metrics(), abs=1e-12)
    assert [row["count"] for row in batched.table()] == [row["count"] for row in whole.table()]
    assert sum(row["count"] for row in whole.table()) == whole.tokens == 1000
    assert sum(row["count"] > 0 for row in whole.table()) > 3  # the 4x logits spread over several bins


@pytest.mark.parametrize("bins", [0, -3, 2.5, True])
def test_an_invalid_bin_count_is_rejected(bins):
    with pytest.raises(ValueError, match="bins"):
        Calibration(bins=bins)


def test_no_tokens_and_mismatched_shapes_are_rejected():
    calibration = Calibration()
    with pytest.raises(ValueError, match="no tokens"):
        calibration.metrics()
    with pytest.raises(ValueError, match="targets"):
        calibration.update(torch.zeros(4, 5), torch.zeros(3, dtype=torch.long))


def test_evaluate_texts_feeds_every_scored_prediction_to_the_hook():
    model, tokenizer = make_model(vocab_size=257), byte_level_tokenizer()
    texts = ["def f(x):\n    return x\n", "import os\n", "héllo wörld"]  # each shorter than the window
    calibration = Calibration(bins=10)
    hooked = evaluate_texts(model, tokenizer, texts, END_OF_TEXT, window=32, on_logits=calibration.update)
    assert hooked == evaluate_texts(model, tokenizer, texts, END_OF_TEXT, window=32)  # the hook changes nothing
    assert calibration.tokens == hooked["tokens"]
    prefix, right = tokenizer.token_to_id(END_OF_TEXT), 0
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        with torch.no_grad():
            logits = model(torch.tensor([[prefix, *ids[:-1]]]))[0]  # (T, V)
        right += (logits.argmax(-1) == torch.tensor(ids)).sum().item()
    assert calibration.metrics()["accuracy"] == pytest.approx(right / hooked["tokens"])


def test_the_evaluate_stage_writes_the_calibration_figures_and_plot_files(tmp_path):
    """The stage as dvc.yaml runs it, on a tiny random model over a byte tokenizer and a small corpus
    (its HumanEval and held-out functions cut down to a few, whatever they score)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"].update(prompts=["def "], max_new_tokens=4, calibration_bins=10)
    params["evaluate"]["humaneval"].update(problems=2, samples=2, max_new_tokens=8, batch_size=4, sft_examples=3)
    params["train"]["seq_len"] = 32
    params["tokenize"]["val_fraction"] = 0.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    texts = [f'def function_{i}(value):\n    """Times {i} plus {i % 7}.\n\n    >>> function_{i}(1)\n    {i + i % 7}\n    """\n'
             f"    return value * {i} + {i % 7}\n" for i in range(12)]  # fmt: skip
    paths = [f"pkg/mod{i}.py" for i in range(12)]
    columns = {"id": [doc_id("dir", p) for p in paths], "source": ["dir"] * 12, "path": paths, "text": texts,
               "n_bytes": [len(t.encode()) for t in texts], "sha256": [text_sha256(t) for t in texts],
               "train_only": [False] * 12}  # fmt: skip
    write_shards(datasets.Dataset.from_dict({c: columns[c] for c in COLUMNS}), tmp_path / "data/clean", 100)
    (tmp_path / "data/tokens").mkdir()
    meta = {"val_baselines_bits_per_byte": {"xz_9e_after_train_text": 2.0}}
    (tmp_path / "data/tokens/meta.json").write_text(json.dumps(meta))
    make_model(vocab_size=257).save_pretrained(tmp_path / "models/model", byte_level_tokenizer())

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        stage_command(REPO, "evaluate"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((tmp_path / "metrics/eval.json").read_text())
    figures = report["calibration"]
    assert set(figures) == {"ece", "mce", "brier", "accuracy", "mean_confidence", "bins", "tokens"}
    assert report["val"]["documents"] > 0 and figures["tokens"] == report["val"]["tokens"]
    assert figures["bins"] == 10 and f"ECE {figures['ece']:.4f} (10 bins)" in result.stdout
    # No binning makes the ECE smaller than the overall gap, and none of a bin's gaps exceeds the MCE.
    assert abs(figures["mean_confidence"] - figures["accuracy"]) - 1e-9 <= figures["ece"] <= figures["mce"] <= 1
    assert 0 <= figures["brier"] <= 2

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["evaluate"]
    plots = {path: props for entry in stage["plots"] for path, props in entry.items()}
    assert set(plots) == {"plots/calibration.csv", "plots/reliability.png"}
    with (tmp_path / "plots/calibration.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and {plots["plots/calibration.csv"][a] for a in "xy"} <= set(CSV_COLUMNS)
    assert sum(int(row["count"]) for row in rows) == figures["tokens"]
    assert all(int(row["count"]) > 0 for row in rows)  # empty bins have no point to draw
    assert all(float(row["bin_lower"]) <= float(row["confidence"]) <= float(row["bin_upper"]) for row in rows)
    assert (tmp_path / "plots/reliability.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    coding, heldout = report["humaneval"], report["sft_heldout"]
    assert coding["problems"] == 2 and coding["executor"] == "bubblewrap" and "pass@1_sampled" in coding
    assert f"HumanEval pass@1 {coding['pass@1']:.1%} of 2 problems" in result.stdout
    problems = (tmp_path / "models/eval/humaneval.jsonl").read_text().splitlines()
    assert [json.loads(line)["task_id"] for line in problems] == ["HumanEval/0", "HumanEval/1"]
    assert heldout["examples"] == len((tmp_path / "models/eval/sft_heldout.jsonl").read_text().splitlines()) > 0
    assert heldout["doctest_examples"] == heldout["examples"]  # every reference passes its own doctest

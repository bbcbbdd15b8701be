"""Distillation (`train.teacher`): the fused loss against a direct computation, and training with a
teacher: its parts logged, a teacher of another vocabulary refused, exact resume, DDP."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train import TINY, assert_bitwise_equal, final_weights, run_training, train_command

from tisslm.core.config import load_params
from tisslm.core.errors import TissLMError
from tisslm.core.loss import linear_cross_entropy, linear_distillation
from tisslm.core.model import ModelConfig, TissLM
from tisslm.core.tokenizer import load_tokenizer
from tisslm.train.trainer import Paths, run_fingerprint, train


def reference(hidden, weight, targets, teacher_hidden, teacher_weight, share, temperature):
    """The loss from full logit matrices with torch's own cross-entropy and KL."""
    logits, teacher_logits = hidden @ weight.T, teacher_hidden @ teacher_weight.T  # (N, vocab)
    valid = targets != -100
    ce = F.cross_entropy(logits, targets, ignore_index=-100)
    kl = F.kl_div(
        F.log_softmax(logits[valid] / temperature, -1),
        F.log_softmax(teacher_logits[valid] / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )  # KL(teacher || student), mean over the target tokens
    return (1 - share) * ce + share * temperature**2 * kl, ce, kl


def case(n=37, d=8, d_teacher=12, vocab=29, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, d, generator=g, dtype=dtype, requires_grad=True)
    teacher_hidden = torch.randn(n, d_teacher, generator=g, dtype=dtype)
    teacher_weight = torch.randn(vocab, d_teacher, generator=g, dtype=dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::5] = -100  # some positions without a target (a mask) count in neither part
    return hidden, weight, targets, teacher_hidden, teacher_weight


@pytest.mark.parametrize(("share", "temperature"), [(0.5, 1.0), (0.3, 2.0), (1.0, 0.7)])
def test_distillation_loss_and_gradients_equal_the_direct_computation(share, temperature):
    hidden, weight, targets, teacher_hidden, teacher_weight = case()
    loss, parts = linear_distillation(
        hidden, weight, targets, teacher_hidden, teacher_weight, share, temperature, chunk_rows=5
    )
    loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected, ce, kl = reference(hidden, weight, targets, teacher_hidden, teacher_weight, share, temperature)
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(parts, torch.stack([ce, kl]).detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[0], hidden.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[1], weight.grad, atol=1e-5, rtol=0)
    with torch.no_grad():  # the path without gradients gives the same values
        loss_no_grad, parts_no_grad = linear_distillation(
            hidden, weight, targets, teacher_hidden, teacher_weight, share, temperature, chunk_rows=5
        )
    assert torch.equal(loss_no_grad, loss.detach()) and torch.equal(parts_no_grad, parts)


def test_distillation_gradcheck_in_float64():
    hidden, weight, targets, teacher_hidden, teacher_weight = case(n=7, d=3, d_teacher=4, vocab=5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w: linear_distillation(h, w, targets, teacher_hidden, teacher_weight, 0.6, 1.5, chunk_rows=3)[0],
        (hidden, weight),
    )


def test_a_teacher_equal_to_the_student_adds_nothing():
    hidden, weight, targets, _, _ = case()
    loss, parts = linear_distillation(hidden, weight, targets, hidden, weight, 1.0, 2.0, chunk_rows=5)
    loss.backward()
    assert abs(parts[1].item()) < 1e-6 and abs(loss.item()) < 1e-6
    assert hidden.grad.abs().max() < 1e-6 and weight.grad.abs().max() < 1e-6


def test_weight_zero_is_the_plain_cross_entropy_exactly():
    hidden, weight, targets, teacher_hidden, teacher_weight = case()
    loss, parts = linear_distillation(hidden, weight, targets, teacher_hidden, teacher_weight, 0.0, 2.0, chunk_rows=5)
    loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = linear_cross_entropy(hidden, weight, targets, chunk_rows=5)
    plain.backward()
    assert torch.equal(loss, plain) and torch.equal(parts[0], plain.detach())
    assert torch.equal(grads[0], hidden.grad) and torch.equal(grads[1], weight.grad)


# ---- training with a teacher ----

STUDENT = ["model.dropout=0.0", "train.max_steps=8", "train.keep_checkpoints=5", "train.eval_interval=4"]


def save_teacher(corpus: Path, directory: Path, seed: int = 1, **overrides) -> Path:
    """A randomly initialised TissLM wider than the test student, saved with the corpus's tokenizer."""
    torch.manual_seed(seed)
    config = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
    teacher = TissLM(ModelConfig(**{**config, **overrides}))
    return teacher.save_pretrained(directory, tokenizer=load_tokenizer(corpus / "tokenizer"))


def paths(corpus: Path, run: Path) -> Paths:
    return Paths(corpus / "tokens", corpus / "tokenizer", run / "checkpoints", run / "model")


def history(run: Path, step: int) -> list[dict]:
    return json.loads((run / "checkpoints" / f"step-{step}" / "trainer_state.json").read_text())["history"]


@pytest.fixture(scope="module")
def teacher(corpus, tmp_path_factory) -> Path:
    return save_teacher(corpus, tmp_path_factory.mktemp("teacher") / "model")


def test_training_with_a_teacher_logs_both_parts_and_resumes_exactly(corpus, teacher, tmp_path, capsys):
    overrides = [*TINY, *STUDENT, f"train.teacher={teacher}", "train.distill_weight=0.4", "train.distill_temperature=2"]
    params = load_params(None, overrides)
    straight = tmp_path / "straight"
    train(params, paths(corpus, straight))
    records = [h for h in history(straight, 8) if "tokens_per_s" in h]
    assert len(records) == 8
    for h in records:  # the logged loss is the mix of its logged parts
        assert math.isfinite(h["train_distill_kl"]) and h["train_distill_kl"] > 0
        assert h["train_loss"] == pytest.approx(0.6 * h["train_data_loss"] + 0.4 * 4 * h["train_distill_kl"], rel=1e-5)

    # Killed after step 4's checkpoint: the resumed run reaches the same weights, bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step-4", resumed / "checkpoints" / "step-4")
    capsys.readouterr()
    train(params, paths(corpus, resumed))
    assert "resumed from" in capsys.readouterr().out
    assert_bitwise_equal(final_weights(straight), final_weights(resumed))
    assert [h["train_distill_kl"] for h in history(resumed, 8) if "tokens_per_s" in h] == [
        h["train_distill_kl"] for h in records
    ]


def test_the_teacher_settings_shape_the_fingerprint_only_with_a_teacher(corpus, teacher, tmp_path):
    base = load_params(None)
    assert run_fingerprint(load_params(None, ["train.distill_weight=0.9"])) == run_fingerprint(base)
    with_teacher = run_fingerprint(load_params(None, [f"train.teacher={teacher}"]))
    assert with_teacher != run_fingerprint(base)
    assert run_fingerprint(load_params(None, [f"train.teacher={teacher}", "train.distill_weight=0.9"])) != with_teacher
    assert run_fingerprint(load_params(None, [f"train.teacher={teacher}", "train.distill_temperature=2"])) != (
        with_teacher
    )
    retrained = shutil.copytree(teacher, tmp_path / "teacher")  # the same path, other weights: another run
    first = run_fingerprint(load_params(None, [f"train.teacher={retrained}"]))
    save_teacher(corpus, retrained, seed=2)
    assert run_fingerprint(load_params(None, [f"train.teacher={retrained}"])) != first


def test_a_teacher_of_another_vocabulary_is_refused(corpus, tmp_path):
    other = save_teacher(corpus, tmp_path / "other", vocab_size=384)
    params = load_params(None, [*TINY, f"train.teacher={other}"])
    with pytest.raises(TissLMError, match=r"vocab_size 384 differs from the model's 320; a teacher must share"):
        train(params, paths(corpus, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_teacher_with_another_tokenizer_fails_in_one_line(corpus, tmp_path):
    """Same vocabulary size, other tokens: refused before training, one line and no traceback (the CLI)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    other = save_teacher(corpus, tmp_path / "other")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(["zzz qqq"] * 10, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    tokenizer.save(str(other / "tokenizer.json"))
    result = subprocess.run(
        train_command(corpus, tmp_path / "run", f"train.teacher={other}"), capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "its tokenizer's vocabulary differs from" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_distillation_trains_under_ddp(corpus, teacher, tmp_path):
    """Two processes (the teacher unwrapped, on each rank) log the parts averaged over the ranks."""
    run = tmp_path / "ddp"
    run_training(corpus, run, *STUDENT, "train.max_steps=4", "train.nproc=2", f"train.teacher={teacher}")
    records = [h for h in history(run, 4) if "tokens_per_s" in h]
    assert len(records) == 4 and all(math.isfinite(h["train_distill_kl"]) for h in records)
    assert json.loads((run / "metrics.json").read_text())["processes"] == 2

"""Training: exact resumption after SIGKILL, checkpoint hygiene, bf16, schedules, the tokenizer.

Any number of processes and nodes: tests/test_train_distributed.py.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from tisslm.core.config import Params
from tisslm.core.model import TOKENIZER_FILE, ModelConfig, TissLM
from tisslm.data.tokens import is_val, split_documents
from tisslm.train.optim import learning_rate, make_optimizer

TINY = [
    "model.vocab_size=320", "model.d_model=48", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.d_ff=96", "model.max_seq_len=64", "model.dropout=0.1",
    "train.seq_len=32", "train.batch_size=8", "train.max_steps=40", "train.warmup_steps=4",
    "train.checkpoint_interval=4", "train.eval_interval=10", "train.eval_batches=2", "train.log_interval=1",
    "train.mlflow=false", "train.precision=fp32", "train.lr=0.01", "train.nproc=1",
]  # fmt: skip


def train_command(corpus: Path, run: Path, *overrides: str) -> list[str]:
    sets = [arg for o in [*TINY, *overrides] for arg in ("--set", o)]
    return [
        sys.executable, "-m", "tisslm.cli", "train", "--tokens", str(corpus / "tokens"),
        "--tokenizer", str(corpus / "tokenizer"), "--checkpoints", str(run / "checkpoints"),
        "--out", str(run / "model"), "--metrics", str(run / "metrics.json"), *sets,
    ]  # fmt: skip


def run_training(corpus: Path, run: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        train_command(corpus, run, *overrides), capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def kill_mid_run(corpus: Path, run: Path, *overrides: str) -> int:
    """Start training, SIGKILL it and every process under it (torchrun's workers) at a random step,
    and return the step of the newest complete checkpoint left behind."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        train_command(corpus, run, *overrides), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=env, start_new_session=True,
    )  # fmt: skip
    target = run / "checkpoints" / f"step-{random.choice([4, 8, 12, 16, 20])}" / "COMPLETE"
    deadline = time.monotonic() + 120
    while not target.exists():
        assert process.poll() is None and time.monotonic() < deadline, f"training ended before {target.parent.name}"
        time.sleep(0.005)
    time.sleep(random.uniform(0.0, 0.05))  # somewhere in the next few steps
    launcher = psutil.Process(process.pid)
    workers = launcher.children(recursive=True)  # torchrun starts its workers in sessions of their own
    for victim in [launcher, *workers]:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.send_signal(signal.SIGKILL)
    process.wait()
    psutil.wait_procs(workers, timeout=10)
    assert not (run / "model").exists(), "training finished before it could be killed; the test proves nothing"
    return max(int(p.parent.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*/COMPLETE"))


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize(
    ("nproc", "optimizer"), [(1, "muon"), (2, "muon"), (1, "adamw")], ids=["1-process", "2-process-DDP", "adamw"]
)
def test_sigkill_and_resume_gives_bitwise_identical_weights(corpus, tmp_path, nproc, optimizer):
    extra = (f"train.nproc={nproc}", f"train.optimizer={optimizer}")
    run_training(corpus, tmp_path / "straight", *extra)
    killed_at = kill_mid_run(corpus, tmp_path / "interrupted", *extra)
    assert 4 <= killed_at < 40
    resumed = run_training(corpus, tmp_path / "interrupted", *extra)
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert_bitwise_equal(final_weights(tmp_path / "straight"), final_weights(tmp_path / "interrupted"))


def test_truncated_or_unmarked_checkpoints_are_skipped(corpus, tmp_path):
    run = tmp_path / "run"
    run_training(corpus, run, "train.max_steps=8", "train.keep_checkpoints=5")
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-4", "step-8"]
    # step-8 truncated but marked, step-12 complete-looking but unmarked: resume must use step-4.
    weights = checkpoints / "step-8" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (checkpoints / "step-12").mkdir()
    (checkpoints / "step-12" / "trainer_state.json").write_text(json.dumps({"step": 12}))
    resumed = run_training(corpus, run, "train.max_steps=8", "train.keep_checkpoints=5")
    output = resumed.stdout + resumed.stderr
    assert "step-8: skipped, not loadable" in output
    assert "resumed from" in output and "step-4 (step 4)" in output
    reference = tmp_path / "reference"
    run_training(corpus, reference, "train.max_steps=8")
    assert_bitwise_equal(final_weights(reference), final_weights(run))


def test_checkpoints_of_another_configuration_are_not_resumed_and_get_pruned(corpus, tmp_path):
    run = tmp_path / "run"
    run_training(corpus, run, "train.max_steps=8")
    changed = run_training(corpus, run, "train.max_steps=4", "model.d_ff=64")
    output = changed.stdout + changed.stderr
    assert "skipped, written by another configuration" in output and "resumed from" not in output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4"]
    extended = run_training(corpus, run, "train.max_steps=8", "model.d_ff=64")  # max_steps may grow
    assert "resumed from" in extended.stdout + extended.stderr


def losses(run: Path, step: int) -> list[float]:
    state = json.loads((run / "checkpoints" / f"step-{step}" / "trainer_state.json").read_text())
    return [h["train_loss"] for h in state["history"] if "tokens_per_s" in h]


def test_bf16_autocast_run_trains(corpus, tmp_path):
    run_training(corpus, tmp_path / "bf16", "train.precision=bf16", "train.max_steps=30", "model.dropout=0.0")
    history = losses(tmp_path / "bf16", 28)
    assert history[-1] < history[0] - 1.0, history
    metrics = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert 0 < metrics["val_bits_per_byte"] < 8 and metrics["tokens_seen"] == 30 * 8 * 32


@pytest.fixture(scope="module")
def tokenizer(corpus):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(corpus / "tokenizer" / TOKENIZER_FILE))


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_tokenizer_round_trips_arbitrary_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text


def test_transformers_loads_the_tokenizer(corpus, tokenizer):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(corpus / "tokenizer" / TOKENIZER_FILE))
    text = "def total(items):\n    return sum(i.price for i in items)  # ✓\n"
    assert fast(text)["input_ids"] == tokenizer.encode(text).ids
    assert fast.decode(fast(text)["input_ids"]) == text


def test_split_is_stable_and_documents_keep_their_side():
    ids = [f"doc-{i}" for i in range(4000)]
    first = [is_val(i, 0.1) for i in ids]
    assert first == [is_val(i, 0.1) for i in ids]
    assert 0.08 < sum(first) / len(first) < 0.12
    more = [f"new-{i}" for i in range(500)] + ids  # new documents never move old ones
    assert [is_val(i, 0.1) for i in more][500:] == first


def test_train_only_documents_never_enter_val():
    ids = [f"doc-{i}" for i in range(400)]
    texts = [f"text {i}" for i in range(400)]
    train_only = [i % 2 == 1 for i in range(400)]
    split = split_documents(ids, texts, train_only, 0.1)
    held_out = {f"text {i}" for i in range(400) if is_val(ids[i], 0.1)}
    assert split["val"] == [t for i, t in enumerate(texts) if t in held_out and not train_only[i]]
    assert held_out - set(split["val"])  # some train-only documents the hash alone would have held out
    assert sorted(split["train"] + split["val"]) == sorted(texts)


def test_training_logs_to_mlflow_and_saves_the_run_id_beside_the_model(corpus, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_training(corpus, tmp_path / "run", "train.mlflow=true", "train.max_steps=10", "train.log_interval=2")
    run_id = json.loads((tmp_path / "run" / "model" / "training.json").read_text())["metrics"]["mlflow_run_id"]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.d_model"] == "48" and run.data.params["train.max_steps"] == "10"
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [2, 4, 6, 8, 10]
    assert {"val_loss", "val_bpb", "tokens_per_s", "mfu", "grad_norm", "lr", "final_val_bits_per_byte"} <= set(
        run.data.metrics
    )
    assert {a.path for a in client.list_artifacts(run_id)} >= {"train_loss.png", "training.json"}


def test_schedules_warm_up_then_reach_min_lr_at_the_end():
    base = Params().train.model_copy(update={"lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "max_steps": 100})
    wsd = base.model_copy(update={"schedule": "wsd", "decay_fraction": 0.2})
    cosine = base.model_copy(update={"schedule": "cosine"})
    for p in (wsd, cosine):
        assert [learning_rate(s, p) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
        assert learning_rate(100, p) == pytest.approx(0.1)  # the floor at max_steps
    assert all(learning_rate(s, wsd) == 1.0 for s in range(10, 81))  # stable until the last 20%
    decay = [learning_rate(s, wsd) for s in range(80, 101)]
    assert decay == pytest.approx([1.0 - 0.9 * i / 20 for i in range(21)])  # linear down to min_lr
    assert learning_rate(50, cosine) < 1.0 and learning_rate(55, cosine) == pytest.approx(0.55)


def test_muon_takes_the_blocks_matrices_and_its_state_round_trips():
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
    p = Params().train.model_copy(update={"optimizer": "muon"})
    torch.manual_seed(0)
    model = TissLM(config)
    optimizer = make_optimizer(model, p)
    muon, adamw = optimizer.parts
    names = {id(q): name for name, q in model.named_parameters()}
    on_muon = {names[id(q)] for group in muon.param_groups for q in group["params"]}
    assert on_muon == {n for n, q in model.named_parameters() if q.dim() == 2 and n.startswith("layers.")}
    assert "tok_emb.weight" not in on_muon and not any("norm" in n for n in on_muon)
    assert len(on_muon) + sum(len(g["params"]) for g in adamw.param_groups) == len(list(model.parameters()))

    x = torch.randint(0, 64, (2, 16))

    def step(m: TissLM, opt: torch.optim.Optimizer) -> None:
        m.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step(model, optimizer)
    twin = TissLM(config)
    twin.load_state_dict(model.state_dict())
    twin_optimizer = make_optimizer(twin, p)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as from disk: no shared tensors
    step(model, optimizer)
    step(twin, twin_optimizer)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    for group in twin_optimizer.param_groups:  # the schedule sets the rate on the loaded optimizer's groups
        group["lr"] = 0.0
    before = [q.detach().clone() for q in twin.parameters()]
    step(twin, twin_optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, twin.parameters(), strict=True))  # lr 0 (and decay 0): no move
    fresh = TissLM(config)
    fresh.load_state_dict(twin.state_dict())
    step(fresh, make_optimizer(fresh, p))  # without the restored momentum the step differs
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))

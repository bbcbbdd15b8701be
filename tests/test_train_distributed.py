"""Training on any number of processes and nodes: the same model from 1, 2 or 4 processes, gradient
accumulation, elastic resume, two torchrun "nodes" on localhost, and the errors before a bad start.

Apart from tests/test_train.py (whose helpers it shares; the `corpus` fixture is conftest's) so that the two files' many
short training runs share the test workers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from test_train import TINY, assert_bitwise_equal, final_weights, losses, run_training, train_command

from tisslm.core.errors import TissLMError


def records(run: Path, step: int) -> list[dict]:
    return json.loads((run / "checkpoints" / f"step-{step}" / "trainer_state.json").read_text())["history"]


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest ||a - b|| / ||a|| over the tensors of two state dicts."""
    return max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in a)


# fp32 sums in another order (a 4-way all-reduce instead of one process's mean) round differently.
# Measured on this machine after 12 steps at lr 0.01, against one process: AdamW's losses differ
# by at most 4.8e-7 and its weights by 2.7e-6 (relative); Muon's Newton-Schulz runs in bf16,
# which turns that rounding into 9.6e-5 of loss and 3.8% of a weight matrix. The bounds below
# leave about 3x of room over those figures.
PROCESS_COUNT_TOLERANCE = {"adamw": {"loss": 2e-6, "weights": 1e-5}, "muon": {"loss": 3e-4, "weights": 0.1}}


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_one_two_and_four_processes_train_the_same_model(corpus, tmp_path, optimizer):
    """train.batch_size is the global batch: the process count decides who computes which
    sequences, never which sequences are seen, so the loss curves agree."""
    common = ("train.max_steps=12", "train.checkpoint_interval=12", "model.dropout=0.0", f"train.optimizer={optimizer}")
    for nproc in (1, 2, 4):
        run_training(corpus, tmp_path / f"n{nproc}", *common, f"train.nproc={nproc}")
    curves = {n: losses(tmp_path / f"n{n}", 12) for n in (1, 2, 4)}
    assert len(curves[1]) == 12 and curves[1][-1] < curves[1][0]  # and it is training, not standing still
    for n in (2, 4):
        tolerance = PROCESS_COUNT_TOLERANCE[optimizer]
        assert max(abs(a - b) for a, b in zip(curves[1], curves[n], strict=True)) < tolerance["loss"]
        assert (
            relative_difference(final_weights(tmp_path / "n1"), final_weights(tmp_path / f"n{n}"))
            < tolerance["weights"]
        )
    metrics = json.loads((tmp_path / "n4" / "metrics.json").read_text())
    assert metrics["processes"] == 4 and metrics["global_batch"] == 8 and metrics["micro_batch"] == 2


def test_torchrun_workers_share_the_cores_without_a_banner(corpus, tmp_path):
    """Launched under torchrun, each worker gets its share of the cores as OpenMP threads (torchrun
    alone gives one each, whatever the host, and prints a banner saying so)."""
    from tisslm.train.plan import threads_per_process

    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    command = train_command(corpus, tmp_path / "run", "train.max_steps=2", "train.nproc=2")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OMP_NUM_THREADS" not in result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["threads_per_process"] == threads_per_process(os.cpu_count(), 2)


def test_gradient_accumulation_gives_the_same_steps(corpus, tmp_path):
    """A smaller micro-batch (more forwards per step) saves memory and changes nothing else."""
    common = ("train.max_steps=6", "train.checkpoint_interval=6", "model.dropout=0.0", "train.optimizer=adamw")
    run_training(corpus, tmp_path / "whole", *common)
    accumulated = run_training(corpus, tmp_path / "micro", *common, "train.micro_batch_size=2")
    assert "resumed" not in accumulated.stdout
    whole, micro = losses(tmp_path / "whole", 6), losses(tmp_path / "micro", 6)
    tolerance = PROCESS_COUNT_TOLERANCE["adamw"]
    assert max(abs(a - b) for a, b in zip(whole, micro, strict=True)) < tolerance["loss"]
    assert (
        relative_difference(final_weights(tmp_path / "whole"), final_weights(tmp_path / "micro")) < tolerance["weights"]
    )


def test_a_two_process_checkpoint_resumes_with_one_process(corpus, tmp_path):
    """Elastic resume: a checkpoint of a 2-process run continues with 1 process on the same curve;
    the checkpoint does not depend on the process count that wrote it."""
    common = ("model.dropout=0.0", "train.optimizer=adamw", "train.keep_checkpoints=10")
    run_training(corpus, tmp_path / "straight", *common, "train.nproc=2")
    elastic = tmp_path / "elastic"
    (elastic / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-20", elastic / "checkpoints" / "step-20")
    resumed = run_training(corpus, elastic, *common, "train.nproc=1")
    assert "step-20 (step 20)" in resumed.stdout
    metrics = json.loads((elastic / "metrics.json").read_text())
    assert metrics["processes"] == 1 and metrics["tokens_seen"] == 40 * 8 * 32
    straight, continued = records(tmp_path / "straight", 40), records(elastic, 40)
    assert [r["step"] for r in straight] == [r["step"] for r in continued] == list(range(1, 41))
    # Measured from step 20 to 40: 2.9e-6 of loss, 6.9e-6 of a weight matrix. Rounding grows as
    # training goes on: resumed at step 4 instead, the curves part by 3e-3 by step 40.
    tolerance = {"loss": 1e-5, "weights": 2e-5}
    assert (
        max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(straight, continued, strict=True))
        < tolerance["loss"]
    )
    assert relative_difference(final_weights(tmp_path / "straight"), final_weights(elastic)) < tolerance["weights"]


@pytest.mark.slow
def test_two_torchrun_nodes_on_localhost_train_what_one_node_trains(corpus, tmp_path):
    """Two launchers, each a "node" of one process, meet at a c10d rendezvous on 127.0.0.1, as the
    k8s jobs' nodes do at the master's address; the model equals one node's two processes."""
    common = ("train.max_steps=8", "train.checkpoint_interval=8", "model.dropout=0.0")
    run_training(corpus, tmp_path / "one-node", *common, "train.nproc=2")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=two-nodes"]  # fmt: skip
    command = launcher + train_command(corpus, tmp_path / "two-nodes", *common)[1:]  # `-m tisslm.cli train ...`
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]  # fmt: skip
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    metrics = json.loads((tmp_path / "two-nodes" / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert_bitwise_equal(final_weights(tmp_path / "one-node"), final_weights(tmp_path / "two-nodes"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("train.batch_size=6", "train.nproc=4"), "train.batch_size=6 (the global batch) does not divide among 4"),
        (("train.micro_batch_size=3",), "train.micro_batch_size=3 does not divide the 8 sequences"),
    ],
)
def test_a_batch_that_does_not_divide_fails_in_one_line_before_training(corpus, tmp_path, overrides, message):
    command = train_command(corpus, tmp_path / "run", *overrides)
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_whose_loss_does_not_reach_the_weights_stops(corpus, tmp_path, monkeypatch):
    """All-zero gradients (as a miscompiled loss gave on a GPU) end the run with an error, rather
    than a model that looks trained."""
    from tisslm.core.config import load_params
    from tisslm.train.trainer import Paths, TrainingLoss, train

    monkeypatch.setattr(TrainingLoss, "forward", lambda self, x, y: self.model.loss(x, y) * 0.0)
    params = load_params(None, TINY)
    paths = Paths(corpus / "tokens", corpus / "tokenizer", tmp_path / "checkpoints", tmp_path / "model")
    with pytest.raises(TissLMError, match=r"gradient norm 0\.0 at step 1: the loss does not reach the weights"):
        train(params, paths)
    assert not (tmp_path / "model").exists()

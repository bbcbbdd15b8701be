"""The decisions a GPU run makes, taken on a CPU: device, process count, batch plan, compile, MFU peak."""

from __future__ import annotations

import pytest
import torch

from tisslm.core.config import load_params
from tisslm.core.errors import TissLMError
from tisslm.core.model import ModelConfig, TissLM
from tisslm.train.perf import datasheet_peak_flops, measured_peak_flops
from tisslm.train.plan import plan_batches, resolve_compile, resolve_nproc, threads_per_process, uses_cuda
from tisslm.train.trainer import COMPILE_CACHE_ENV, OPERATIONAL, TrainingLoss, run_fingerprint


@pytest.mark.parametrize(
    ("nproc", "cuda", "gpus", "cores", "expected"),
    [
        ("auto", True, 1, 16, 1),  # one GPU: one process (it used to start 2 and crash on cuda:1)
        ("auto", True, 8, 128, 8),
        ("auto", False, 0, 2, 2),  # the CPU default this project was measured with
        ("auto", False, 0, 1, 1),
        ("auto", False, 0, 64, 2),
        (3, False, 0, 2, 3),  # asked for: as many as asked, on a CPU
        (2, True, 4, 16, 2),
    ],
)
def test_process_count(nproc, cuda, gpus, cores, expected):
    assert resolve_nproc(nproc, cuda, gpus, cores) == expected


@pytest.mark.parametrize(
    ("cores", "nproc", "expected"),
    [(2, 2, 1), (16, 2, 8), (17, 2, 8), (2, 4, 1), (128, 8, 16), (1, 1, 1)],
)
def test_processes_share_the_cores_out(cores, nproc, expected):
    assert threads_per_process(cores, nproc) == expected


def test_more_processes_than_gpus_is_refused_in_one_line():
    with pytest.raises(TissLMError, match=r"train.nproc=2: only 1 CUDA device\(s\) visible"):
        resolve_nproc(2, True, 1, 16)


def test_device_choice():
    assert uses_cuda("auto", True) and not uses_cuda("auto", False) and not uses_cuda("cpu", True)
    with pytest.raises(TissLMError, match=r"train\.device=cuda: no CUDA device"):
        uses_cuda("cuda", False)
    with pytest.raises(TissLMError, match=r"sft\.device=cuda: no CUDA device"):  # the stage's own setting named
        uses_cuda("cuda", False, "sft.device")


def test_compile_is_on_for_cuda_only_when_auto():
    assert resolve_compile("auto", "cuda") and not resolve_compile("auto", "cpu")
    assert resolve_compile(True, "cpu") and not resolve_compile(False, "cuda")


@pytest.mark.parametrize(("global_batch", "world", "micro"), [(16, 1, None), (16, 2, None), (16, 4, 2), (8, 8, 1)])
def test_the_plan_covers_every_sequence_of_the_global_batch_once(global_batch, world, micro):
    plan = plan_batches(global_batch, world, micro)
    taken = [
        i for rank in range(world) for m in range(plan.accumulation) for i in range(global_batch)[plan.rows(rank, m)]
    ]
    assert sorted(taken) == list(range(global_batch))
    assert plan.per_process * world == global_batch and plan.micro_batch * plan.accumulation == plan.per_process


def test_default_plan_keeps_the_previous_default_batches():
    """16 global on 2 processes: rank r takes rows 8r..8r+7 of the step's draw, as 8 per process did."""
    plan = plan_batches(16, 2, None)
    assert (plan.rows(0, 0), plan.rows(1, 0), plan.accumulation) == (slice(0, 8), slice(8, 16), 1)


@pytest.mark.parametrize(
    ("global_batch", "world", "micro", "message"),
    [
        (16, 3, None, "train.batch_size=16 (the global batch) does not divide among 3 processes"),
        (16, 2, 3, "train.micro_batch_size=3 does not divide the 8 sequences each of 2 processes"),
    ],
)
def test_a_plan_that_does_not_divide_names_the_param(global_batch, world, micro, message):
    with pytest.raises(TissLMError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_batches(global_batch, world, micro)


def test_the_checkpoint_fingerprint_ignores_how_the_work_is_shared():
    base = load_params(None)
    for override in ("train.nproc=4", "train.micro_batch_size=2", "train.compile=true", "train.device=cpu"):
        assert run_fingerprint(load_params(None, [override])) == run_fingerprint(base), override
    assert run_fingerprint(load_params(None, ["train.batch_size=32"])) != run_fingerprint(base)
    assert {"nproc", "micro_batch_size"} <= OPERATIONAL


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("AMD Instinct MI300X", 1307.4),
        ("NVIDIA B200", 2250.0),
    ],
)
def test_datasheet_peaks(name, tflops):
    assert datasheet_peak_flops(name, torch.bfloat16) == pytest.approx(tflops * 1e12)


def test_unknown_devices_and_fp32_have_no_datasheet_peak():
    assert datasheet_peak_flops("NVIDIA GeForce GTX 1080", torch.bfloat16) is None
    assert datasheet_peak_flops("cpu", torch.bfloat16) is None
    assert datasheet_peak_flops("NVIDIA H200", torch.float32) is None  # TF32 or not: no one figure


def test_the_measured_peak_is_a_positive_rate():
    assert measured_peak_flops(torch.float32) > 1e8


def test_compiled_training_loss_equals_eager(tmp_path, monkeypatch):
    """The compiled path (train.compile: auto on CUDA) computes the same loss and gradients."""
    monkeypatch.chdir(tmp_path)  # the compile cache goes to ./.cache/torchinductor
    # Unset, as in a fresh training process (inductor sets it to its /tmp default at its first compile).
    monkeypatch.setenv(COMPILE_CACHE_ENV, "restored at teardown")
    monkeypatch.delenv(COMPILE_CACHE_ENV)
    config = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
    torch.manual_seed(0)
    eager, compiled = TissLM(config), TissLM(config)
    compiled.load_state_dict(eager.state_dict())
    x = torch.randint(0, 256, (4, 17))
    losses = []
    for model, compile_model in ((eager, False), (compiled, True)):
        loss = TrainingLoss(model, compile_model=compile_model)(x[:, :-1], x[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert (tmp_path / ".cache" / "torchinductor").is_dir()

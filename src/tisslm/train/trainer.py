"""The training loop: one process, N processes on one host, or N hosts, the same code.

Launched plainly it trains in one process; under torchrun (RANK/WORLD_SIZE set) each process
joins a process group (gloo on CPU, nccl on CUDA) and DDP averages the gradients. Batches are
random windows of the token memmap chosen as a function of (seed, step, micro-step) and split
by rank, so a run resumed from a checkpoint sees exactly the batches it would have seen, and
N processes with batch b see what one process with batch N*b sees. Rank 0 alone writes logs,
checkpoints, metrics and MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tisslm.core.config import Params, TrainParams
from tisslm.core.errors import TissLMError
from tisslm.core.io import atomic_write_json, atomic_write_text
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import END_OF_TEXT, load_tokenizer
from tisslm.data.tokens import documents_in, load_split, read_meta
from tisslm.eval.evaluate import document_loglikelihoods, perplexity_metrics
from tisslm.tracking import RUN_ENV, Tracker
from tisslm.train.checkpoint import load_latest, save_checkpoint
from tisslm.train.perf import matmul_peak_flops


@dataclass
class Paths:
    tokens: Path  # data/tokens: train.bin, val.bin, meta.json
    tokenizer: Path  # directory holding tokenizer.json
    checkpoints: Path  # models/checkpoints
    model: Path  # models/model: the final model
    metrics: Path | None = None  # metrics/train.json
    loss_csv: Path | None = None  # plots/train_loss.csv


@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# Train params that do not change the trajectory: a checkpoint stays resumable across them.
OPERATIONAL = {"max_steps", "eval_interval", "eval_batches", "log_interval", "checkpoint_interval",
               "keep_checkpoints", "mlflow", "compile", "device"}  # fmt: skip


def run_fingerprint(params: Params, world_size: int) -> str:
    """What a checkpoint must share with this run to be resumed by it."""
    shaping = {
        "model": params.model.model_dump(),
        "train": {k: v for k, v in params.train.model_dump().items() if k not in OPERATIONAL},
        "world_size": world_size,
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def setup_distributed(device: str) -> Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise TissLMError("train.device=cuda: no CUDA device is available")
    torch_device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(rank, world_size, torch_device)


class TrainingLoss(torch.nn.Module):
    """Routes the fused loss through `forward`, so that DDP's gradient hooks see it."""

    def __init__(self, model: TissLM):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model.loss(idx, targets)


def window_starts(seed: int, step: int, micro: int, count: int, n_tokens: int, seq_len: int) -> np.ndarray:
    """Start offsets of `count` windows: a pure function of (seed, step, micro-step)."""
    if n_tokens <= seq_len + 1:
        raise TissLMError(f"train.seq_len={seq_len}: the token file holds only {n_tokens} tokens")
    digest = hashlib.sha256(f"{seed}:{step}:{micro}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.integers(0, n_tokens - seq_len - 1, size=count)


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int, device: torch.device):
    batch = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    batch = torch.from_numpy(batch).to(device, non_blocking=True)  # (B, seq_len + 1)
    return batch[:, :-1], batch[:, 1:]


def learning_rate(step: int, p: TrainParams) -> float:
    """Linear warmup to `lr`, then down to `min_lr` at max_steps: by a cosine, or (wsd) held at `lr`
    until the last `decay_fraction` of the steps and decayed linearly there. A stable phase keeps
    the rate high for longest, and the short decay at the end still anneals."""
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    if p.schedule == "wsd":
        decay_start = p.max_steps * (1 - p.decay_fraction)
        progress = max(0.0, step - decay_start) / max(1.0, p.max_steps - decay_start)
        return p.lr - (p.lr - p.min_lr) * min(1.0, progress)
    progress = (step - p.warmup_steps) / max(1, p.max_steps - p.warmup_steps)
    return p.min_lr + 0.5 * (p.lr - p.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the blocks' 2-D matrices, AdamW on embeddings, head and norms, as one optimizer, so
    that the loop, the schedule and the checkpoint see one state. Muon orthogonalises each matrix's
    momentum; its updates are scaled to AdamW's RMS (`match_rms_adamw`), so one `lr` serves both."""

    def __init__(self, model: torch.nn.Module, p: TrainParams):
        named = [(name, q) for name, q in model.named_parameters() if q.requires_grad]
        hidden = [q for name, q in named if q.dim() == 2 and name.startswith("layers.")]
        hidden_ids = {id(q) for q in hidden}
        rest = [q for _, q in named if id(q) not in hidden_ids]
        self.parts = [
            torch.optim.Muon(hidden, lr=p.lr, weight_decay=p.weight_decay, adjust_lr_fn="match_rms_adamw"),
            adamw(rest, p),
        ]
        super().__init__([{"params": []}], {})
        self.param_groups = [group for part in self.parts for group in part.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The parts' states as one optimizer's: parameter indices run on from one part to the next."""
        state, groups, offset = {}, [], 0
        for part in self.parts:
            part_state = part.state_dict()
            state.update({index + offset: values for index, values in part_state["state"].items()})
            groups += [
                {**group, "params": [i + offset for i in group["params"]]} for group in part_state["param_groups"]
            ]
            offset += sum(len(group["params"]) for group in part_state["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups, offset = list(state_dict["param_groups"]), 0
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{len(groups)} parameter groups saved, {len(self.param_groups)} expected")
        for part in self.parts:
            part_groups, groups = groups[: len(part.param_groups)], groups[len(part.param_groups) :]
            count = sum(len(group["params"]) for group in part_groups)
            part.load_state_dict({
                "state": {int(i) - offset: v for i, v in state_dict["state"].items() if offset <= int(i) < offset + count},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in part_groups],
            })  # fmt: skip
            offset += count
        self.param_groups = [group for part in self.parts for group in part.param_groups]  # loading made new dicts


def adamw(params: list[torch.nn.Parameter], p: TrainParams) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norms' gains are not pulled towards zero."""
    groups = [
        {"params": [q for q in params if q.dim() >= 2], "weight_decay": p.weight_decay},
        {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=p.lr, betas=(p.beta1, p.beta2), foreach=False)


def make_optimizer(model: torch.nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    """The optimizer `train.optimizer` names, over the model's trainable parameters."""
    if p.optimizer == "muon":
        return MuonAdamW(model, p)
    return adamw([q for q in model.parameters() if q.requires_grad], p)


def autocast(p: TrainParams, device: torch.device):
    if p.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def estimate_val_loss(model: TissLM, val: np.ndarray, p: TrainParams, d: Distributed) -> float:
    """Mean loss over the same `eval_batches` validation windows every time, split across ranks."""
    model.eval()
    total = torch.zeros(2, device=d.device)
    for batch in range(d.rank, p.eval_batches, d.world_size):
        x, y = windows(val, window_starts(p.seed, -1, batch, p.batch_size, len(val), p.seq_len), p.seq_len, d.device)
        with autocast(p, d.device):
            total += torch.stack([model.loss(x, y).float(), torch.ones((), device=d.device)])
    if d.world_size > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def _rng_state(d: Distributed) -> dict[str, torch.Tensor]:
    local = {"cpu": torch.get_rng_state()}
    if d.device.type == "cuda":
        local["cuda"] = torch.cuda.get_rng_state(d.device)
    gathered = [local]
    if d.world_size > 1:
        gathered = [None] * d.world_size
        dist.all_gather_object(gathered, local)
    return {f"rank{r}.{kind}": state for r, states in enumerate(gathered) for kind, state in states.items()}


def _restore_rng(rng: dict[str, torch.Tensor], d: Distributed) -> None:
    torch.set_rng_state(rng[f"rank{d.rank}.cpu"])
    if d.device.type == "cuda" and f"rank{d.rank}.cuda" in rng:
        torch.cuda.set_rng_state(rng[f"rank{d.rank}.cuda"], d.device)


def _write_loss_csv(path: Path, history: list[dict]) -> None:
    lines = ["step,train_loss,val_loss"]
    lines += [
        f"{h['step']},{h['train_loss']:.6f},{'' if h.get('val_loss') is None else format(h['val_loss'], '.6f')}"
        for h in history
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def train(params: Params, paths: Paths, on_eval: Callable[[dict], None] | None = None) -> dict | None:
    """Train (or resume) to params.train.max_steps; rank 0 returns the final metrics.

    `on_eval` sees each record with a val loss on rank 0 (step, val_loss, val_bpb, ...); an
    exception it raises (a pruned HPO trial) ends the run, marked failed in MLflow.
    """
    p = params.train
    d = setup_distributed(p.device)
    meta = read_meta(paths.tokens)
    if meta["vocab_size"] > params.model.vocab_size:
        raise TissLMError(
            f"model.vocab_size={params.model.vocab_size} is smaller than the tokenizer's {meta['vocab_size']}"
        )
    if p.seq_len > params.model.max_seq_len:
        raise TissLMError(f"train.seq_len={p.seq_len} exceeds model.max_seq_len={params.model.max_seq_len}")
    train_tokens, val_tokens = load_split(paths.tokens, "train"), load_split(paths.tokens, "val")

    torch.manual_seed(p.seed)
    model = TissLM(params.model).to(d.device)
    optimizer = make_optimizer(model, p)
    fingerprint = run_fingerprint(params, d.world_size)
    resumed = load_latest(paths.checkpoints, model, optimizer, fingerprint)
    start_step = resumed.step if resumed else 0
    state = resumed.state if resumed else {"history": [], "tokens_seen": 0, "train_seconds": 0.0}
    state["fingerprint"] = fingerprint
    if resumed:
        _restore_rng(resumed.rng, d)
        if d.is_main:
            print(f"train: resumed from {resumed.path} (step {start_step})")
    trainable = TrainingLoss(model)
    if d.world_size > 1:
        trainable = DistributedDataParallel(trainable, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    if p.compile:
        trainable = torch.compile(trainable)

    # A flow's run for this stage wins over the checkpoint's: a retried stage logs where its flow looks.
    run_id = os.environ.get(RUN_ENV) or state.get("mlflow_run_id")
    tracker = Tracker.start(params, run_id) if d.is_main and p.mlflow else None
    if tracker:
        state["mlflow_run_id"] = tracker.run_id
    run = _Run(params, paths, d, model, trainable, optimizer, state, train_tokens, val_tokens, meta, tracker, on_eval)
    try:
        _loop(run, start_step)
        result = _finish(run) if d.is_main else None
    except BaseException:
        if tracker:
            tracker.fail()
        raise
    if d.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


@dataclass
class _Run:
    """What the steps of one training run share."""

    params: Params
    paths: Paths
    d: Distributed
    model: TissLM
    trainable: torch.nn.Module  # the model's loss, wrapped in DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    state: dict  # checkpointed: history, tokens_seen, train_seconds, fingerprint, mlflow_run_id
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    meta: dict  # data/tokens/meta.json
    tracker: Tracker | None
    on_eval: Callable[[dict], None] | None


def _loop(run: _Run, start_step: int) -> None:
    """Steps start_step .. max_steps: forward/backward/update, logging, validation, checkpoints."""
    p, d, model, optimizer, state = run.params.train, run.d, run.model, run.optimizer, run.state
    train_tokens, trainable = run.train_tokens, run.trainable
    val_bytes_per_token = run.meta["val"]["bytes"] / run.meta["val"]["tokens"]
    tokens_per_step = p.batch_size * p.seq_len * p.grad_accum * d.world_size
    flops_per_token = model.flops_per_token(p.seq_len)
    # Each process measures what its own share of the machine (cores or GPU) does; N of them do N times that.
    peak = (
        d.world_size * matmul_peak_flops(torch.bfloat16 if p.precision == "bf16" else torch.float32, d.device)
        if d.is_main
        else 0.0
    )
    bar = tqdm(total=p.max_steps, initial=start_step, desc="train", unit=" step", disable=not d.is_main)
    window_start, window_tokens, loss_sum, loss_count = time.perf_counter(), 0, 0.0, 0
    model.train()
    for step in range(start_step, p.max_steps):
        lr = learning_rate(step, p)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=d.device)
        for micro in range(p.grad_accum):
            starts = window_starts(p.seed, step, micro, p.batch_size * d.world_size, len(train_tokens), p.seq_len)
            x, y = windows(
                train_tokens, starts[d.rank * p.batch_size : (d.rank + 1) * p.batch_size], p.seq_len, d.device
            )
            sync = contextlib.nullcontext()
            if d.world_size > 1 and micro < p.grad_accum - 1:
                sync = trainable.no_sync()
            with sync, autocast(p, d.device):
                loss = trainable(x, y) / p.grad_accum
            loss.backward()
            step_loss += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip if p.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if d.world_size > 1:
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
        done = step + 1
        state["tokens_seen"] += tokens_per_step
        window_tokens += tokens_per_step
        loss_sum, loss_count = loss_sum + step_loss.item(), loss_count + 1
        bar.update(1)

        record = None
        if done % p.log_interval == 0 or done == p.max_steps:
            elapsed = time.perf_counter() - window_start
            state["train_seconds"] += elapsed
            tokens_per_s = window_tokens / max(elapsed, 1e-9)
            record = {
                "step": done,
                "train_loss": loss_sum / loss_count,
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "tokens_per_s": tokens_per_s,
                "mfu": tokens_per_s * flops_per_token / peak if peak else None,
            }
            window_start, window_tokens, loss_sum, loss_count = time.perf_counter(), 0, 0.0, 0
        if done % p.eval_interval == 0 or done == p.max_steps:
            val_loss = estimate_val_loss(model, run.val_tokens, p, d)
            record = record or {"step": done, "train_loss": step_loss.item()}
            record |= {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) / val_bytes_per_token}
        if record and d.is_main:
            state["history"].append(record)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}")
            if run.tracker:
                run.tracker.log_step(record)
            if run.on_eval and "val_loss" in record:
                run.on_eval(record)
        if done % p.checkpoint_interval == 0 or done == p.max_steps:
            rng = _rng_state(d)
            if d.is_main:
                save_checkpoint(run.paths.checkpoints, done, model, optimizer, rng, state, p.keep_checkpoints)
            if d.world_size > 1:
                dist.barrier()
    bar.close()


def _finish(run: _Run) -> dict:
    """Score the whole val split, save the model, write metrics and plots, close the MLflow run."""
    params, paths, meta, state, model, tracker = run.params, run.paths, run.meta, run.state, run.model, run.tracker
    p = params.train
    # The evaluate stage's scorer and formula, on the same documents: one val bits/byte, not two.
    end = load_tokenizer(paths.tokenizer).token_to_id(END_OF_TEXT)
    documents = documents_in(run.val_tokens, end)
    loglikelihoods = document_loglikelihoods(model, documents, end, p.seq_len, params.evaluate.batch_size)
    val = perplexity_metrics(loglikelihoods, sum(map(len, documents)), meta["val"]["bytes"])
    val_bpb = val["bits_per_byte"]
    baselines = meta["val_baselines_bits_per_byte"]
    logged = [h for h in state["history"] if "tokens_per_s" in h]
    metrics = {
        "steps": p.max_steps,
        "tokens_seen": state["tokens_seen"],
        "train_seconds": round(state["train_seconds"], 1),
        "final_train_loss": logged[-1]["train_loss"] if logged else None,
        "tokens_per_s": sum(h["tokens_per_s"] for h in logged[-10:]) / max(1, len(logged[-10:])),
        "mfu": logged[-1]["mfu"] if logged else None,
        "val_loss_per_token": val["loss_per_token"],
        "val_bits_per_byte": val_bpb,
        "val_tokens_scored": val["tokens"],
        "val_bytes": val["bytes"],
        "xz_9e_bits_per_byte": baselines["xz_9e"],
        "xz_9e_after_train_text_bits_per_byte": baselines["xz_9e_after_train_text"],
        "beats_xz": val_bpb < min(baselines["xz_9e"], baselines["xz_9e_after_train_text"]),
        "mlflow_run_id": state.get("mlflow_run_id"),
        # Where the last steps ran, for the model card: a resumed run may have moved.
        "device": torch.cuda.get_device_name(run.d.device) if run.d.device.type == "cuda" else "cpu",
        "processes": run.d.world_size,
        "precision": p.precision,
    }
    model.save_pretrained(paths.model, tokenizer=load_tokenizer(paths.tokenizer))
    atomic_write_json(
        paths.model / "training.json", {"params": params.model_dump(mode="json", by_alias=True), "metrics": metrics}
    )
    if paths.metrics:
        atomic_write_json(paths.metrics, metrics)
    if paths.loss_csv:
        _write_loss_csv(paths.loss_csv, state["history"])
    if tracker:
        tracker.finish(metrics, state["history"], paths.model)
    return metrics

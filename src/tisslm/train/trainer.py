"""The training loop: one process, N processes on one host, or N hosts, the same code and the same model.

Launched plainly it trains in one process; under torchrun (RANK/WORLD_SIZE set) each process
joins a process group (gloo on CPU, nccl on CUDA) and DDP averages the gradients.
`train.batch_size` is the global batch: the sequences of each optimizer step are random windows
of the token memmap chosen as a function of (seed, step) alone, and the process count only
decides who computes which of them (`tisslm.train.plan`). So 1, 2 or 4 processes train the same
model (to the rounding of their sums), a run resumed from a checkpoint sees exactly the batches
it would have seen, and a checkpoint written by N processes resumes with M. Rank 0 alone writes
logs, checkpoints, metrics and MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tisslm.core.chat import CHAT_FILES
from tisslm.core.config import Params, TrainParams
from tisslm.core.errors import TissLMError
from tisslm.core.io import atomic_write_json, atomic_write_text
from tisslm.core.loss import linear_distillation, loss_chunk_rows
from tisslm.core.model import TOKENIZER_FILE, TissLM, file_sha256, weights_sha256, with_init_from
from tisslm.core.tokenizer import END_OF_TEXT, load_tokenizer
from tisslm.data.tokens import documents_in, load_split, read_meta
from tisslm.eval.evaluate import document_loglikelihoods, perplexity_metrics
from tisslm.tracking import RUN_ENV, Tracker
from tisslm.train.checkpoint import load_latest, save_checkpoint
from tisslm.train.lora import ADAPTER_DIR, add_lora, merged, save_adapter
from tisslm.train.optim import learning_rate, make_optimizer
from tisslm.train.perf import device_name, peak_flops
from tisslm.train.plan import BatchPlan, autocast, plan_batches, resolve_compile, uses_cuda


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


# Train params that do not change the trajectory: a checkpoint stays resumable across them. The
# process count and the micro-batch only change who computes what, so a checkpoint of N processes
# resumes with M (elastic resume).
OPERATIONAL = {"max_steps", "eval_interval", "eval_batches", "log_interval", "checkpoint_interval",
               "keep_checkpoints", "mlflow", "compile", "device", "nproc", "micro_batch_size"}  # fmt: skip
# Without a teacher these shape nothing: left out, a run without one keeps its fingerprint.
DISTILLATION = {"teacher", "distill_weight", "distill_temperature"}


def run_fingerprint(params: Params) -> str:
    """What a checkpoint must share with this run to be resumed by it."""
    train = {k: v for k, v in params.train.model_dump(mode="json").items() if k not in OPERATIONAL}
    if params.train.teacher is None:
        train = {k: v for k, v in train.items() if k not in DISTILLATION}
    if params.train.init_from is None:
        del train["init_from"]  # left out: a run from random init keeps its fingerprint
    if params.train.lora is None:
        del train["lora"]  # likewise: a run without LoRA keeps its fingerprint
    shaping = {"model": params.model.model_dump(), "train": train}
    if params.train.init_from is not None:  # its weights, not only its path: a re-import there shows
        shaping["init_weights_sha256"] = weights_sha256(params.train.init_from)
    if params.train.teacher is not None:  # so too the teacher's: a retrained teacher is another run
        shaping["teacher_weights_sha256"] = weights_sha256(params.train.teacher)
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def setup_distributed(device: str) -> Distributed:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = uses_cuda(device, torch.cuda.is_available())
    if cuda and local_rank >= torch.cuda.device_count():
        raise TissLMError(
            f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible; "
            "run at most one process per GPU (train.nproc=auto)"
        )
    torch_device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Distributed(rank, world_size, torch_device)


# Inductor's caches (FX graphs, AOT autograd, Triton kernels) in a known place that outlives the
# process, instead of /tmp: a rerun in the same project compiles from cache.
COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
COMPILE_CACHE = Path(".cache") / "torchinductor"


@dataclass(frozen=True)
class Teacher:
    """A frozen model whose softened next-token distributions the student also learns (`train.teacher`).
    A plain attribute of `TrainingLoss`, not a submodule: DDP neither broadcasts nor watches it,
    and the student's parameters and state dict stay its own."""

    model: TissLM
    share: float  # train.distill_weight: the KL's share of the loss
    temperature: float  # train.distill_temperature


def load_teacher(p: TrainParams, student: TissLM, tokenizer_dir: Path, device: torch.device) -> Teacher | None:
    """`train.teacher` on `device`, in fp32 and eval mode, frozen; None without one. It must
    predict over the student's vocabulary: the same rows and, when it carries a tokenizer, the
    same tokens as the run's tokenizer."""
    if p.teacher is None:
        return None
    where = f"train.teacher={p.teacher}"
    teacher = TissLM.from_pretrained(p.teacher, device)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise TissLMError(
            f"{where}: vocab_size {teacher.config.vocab_size} differs from the model's {student.config.vocab_size}; "
            "a teacher must share the tokenizer"
        )
    if (p.teacher / TOKENIZER_FILE).is_file() and (
        load_tokenizer(p.teacher).get_vocab() != load_tokenizer(tokenizer_dir).get_vocab()
    ):
        raise TissLMError(f"{where}: its tokenizer's vocabulary differs from {tokenizer_dir}'s")
    if p.seq_len > teacher.config.max_seq_len:
        raise TissLMError(f"{where}: train.seq_len={p.seq_len} exceeds its max_seq_len={teacher.config.max_seq_len}")
    teacher.float().eval().requires_grad_(False)
    return Teacher(teacher, p.distill_weight, p.distill_temperature)


class TrainingLoss(torch.nn.Module):
    """Routes the fused loss through `forward`, so that DDP's gradient hooks see it.

    Compiled as torchtitan does it: each transformer block on its own. The blocks differ only in
    their weights, so they share one graph, the compile costs one block rather than the whole
    model, and the state dict keeps its names. The chunked cross-entropy stays eager: compiled, it
    gave all-zero gradients on an H200 (torch 2.11) while its loss was right, and the same compile
    was exact on a CPU (benchmarks/results/gpu_diagnosis.json)."""

    def __init__(self, model: TissLM, compile_model: bool = False, teacher: Teacher | None = None):
        super().__init__()
        self.model, self.teacher = model, teacher
        # With a teacher: the last forward's (data loss, KL to the teacher), detached, for the logs.
        self.parts: torch.Tensor | None = None
        if compile_model:
            os.environ.setdefault(COMPILE_CACHE_ENV, str(COMPILE_CACHE.resolve()))
            for block in model.layers:
                block.compile(dynamic=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            return self.model.loss(idx, targets)
        with torch.no_grad():
            teacher_hidden = self.teacher.model.hidden_states(idx).flatten(0, 1)  # (B * T, teacher d_model)
        hidden = self.model.hidden_states(idx).flatten(0, 1)  # (B * T, d_model)
        loss, self.parts = linear_distillation(
            hidden, self.model.lm_head.weight, targets.flatten(), teacher_hidden, self.teacher.model.lm_head.weight,
            self.teacher.share, self.teacher.temperature, chunk_rows=loss_chunk_rows(hidden.device.type),
        )  # fmt: skip
        return loss


def window_starts(seed: int, step: int, micro: int, count: int, n_tokens: int, seq_len: int) -> np.ndarray:
    """Start offsets of `count` windows: a pure function of (seed, step, micro). Training draws a
    step's whole global batch with micro 0; validation draws batch i of its fixed set as step -1."""
    if n_tokens <= seq_len + 1:
        raise TissLMError(f"train.seq_len={seq_len}: the token file holds only {n_tokens} tokens")
    digest = hashlib.sha256(f"{seed}:{step}:{micro}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return rng.integers(0, n_tokens - seq_len - 1, size=count)


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int, device: torch.device):
    """Inputs and targets (B, seq_len) of the windows at `starts`. On CUDA the batch goes through
    pinned memory, so the copy runs asynchronously while the GPU still works on the last step."""
    batch = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))
    if device.type == "cuda":
        batch = batch.pin_memory()
    batch = batch.to(device, non_blocking=True)  # (B, seq_len + 1)
    return batch[:, :-1], batch[:, 1:]


@dataclass
class Throughput:
    """Tokens per second and model FLOPs utilisation over the steps since the last log."""

    flops_per_token: float
    peak: dict  # tisslm.train.perf.peak_flops of one process's device, times the process count
    started: float = field(default_factory=time.perf_counter)
    tokens: int = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def take(self) -> tuple[float, dict]:
        """(seconds, {"tokens_per_s", "mfu", "mfu_measured_peak"}) since the last take."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        tokens_per_s = self.tokens / elapsed
        flops = tokens_per_s * self.flops_per_token
        rates = {
            "tokens_per_s": tokens_per_s,
            "mfu": flops / (self.peak["datasheet"] or self.peak["measured"]),
            "mfu_measured_peak": flops / self.peak["measured"],
        }
        self.started, self.tokens = time.perf_counter(), 0
        return elapsed, rates


class Trainer:
    """One training run: the model, its optimizer and data, and the parts of a step (schedule,
    forward/backward/update, validation, checkpoint, logging), each a method of its own."""

    def __init__(self, params: Params, paths: Paths, on_eval: Callable[[dict], None] | None, run_id: str | None):
        d = self.d = setup_distributed(params.train.device)
        params = with_init_from(params, announce=d.is_main)
        self.params, self.paths, self.on_eval = params, paths, on_eval
        p = self.p = params.train
        self.plan: BatchPlan = plan_batches(p.batch_size, d.world_size, p.micro_batch_size)
        self.meta = read_meta(paths.tokens)
        if self.meta["vocab_size"] > params.model.vocab_size:
            raise TissLMError(
                f"model.vocab_size={params.model.vocab_size} is smaller than the tokenizer's {self.meta['vocab_size']}"
            )
        model_from = f"train.init_from={p.init_from}: its " if p.init_from else ""
        if p.seq_len > params.model.max_seq_len:
            whose = f"train.init_from={p.init_from}'s max_seq_len" if p.init_from else "model.max_seq_len"
            raise TissLMError(f"train.seq_len={p.seq_len} exceeds {whose}={params.model.max_seq_len}")
        if p.init_from and self.meta.get("tokenizer_sha256") != file_sha256(p.init_from / TOKENIZER_FILE):
            raise TissLMError(
                f"{model_from}tokenizer did not make {paths.tokens} (rerun the tokenizer and tokenize stages)"
            )
        self.train_tokens, self.val_tokens = load_split(paths.tokens, "train"), load_split(paths.tokens, "val")

        torch.manual_seed(p.seed)
        if p.init_from:  # the imported weights replace random init, in fp32 whatever the file holds
            self.model = TissLM.from_pretrained(p.init_from, d.device).float()
        else:
            self.model = TissLM(params.model).to(d.device)
        if p.lora:  # the base frozen: only the adapters train, and only they reach the optimizer
            if p.lora.base != "fp32":
                raise TissLMError(
                    f"train.lora.base={p.lora.base}: train's checkpoints hold plain tensors (int8 is for sft)"
                )
            add_lora(self.model, p.lora)
        self.optimizer = make_optimizer(self.model, p)
        teacher = load_teacher(p, self.model, paths.tokenizer, d.device)  # checked before any checkpoint is read
        fingerprint = run_fingerprint(params)
        resumed = load_latest(paths.checkpoints, self.model, self.optimizer, fingerprint)
        self.start_step = resumed.step if resumed else 0
        self.state = resumed.state if resumed else {"history": [], "tokens_seen": 0, "train_seconds": 0.0}
        self.state["fingerprint"] = fingerprint
        if resumed:
            self._restore_rng(resumed.rng)
            if d.is_main:
                print(f"train: resumed from {resumed.path} (step {self.start_step})")
        self.training_loss = TrainingLoss(self.model, resolve_compile(p.compile, d.device.type), teacher)
        self.trainable: torch.nn.Module = self.training_loss
        if d.world_size > 1:
            device_ids = [d.device.index] if d.device.type == "cuda" else None
            self.trainable = DistributedDataParallel(self.trainable, device_ids=device_ids)

        # A flow's run for this stage wins over the checkpoint's: a retried stage logs where its flow looks.
        run_id = run_id or os.environ.get(RUN_ENV) or self.state.get("mlflow_run_id")
        self.tracker = Tracker.start(params, run_id) if d.is_main and p.mlflow else None
        if self.tracker:
            self.state["mlflow_run_id"] = self.tracker.run_id

    # ---- the parts of a step ----

    def set_learning_rate(self, step: int) -> float:
        lr = learning_rate(step, self.p)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward and backward over this rank's share of the step's global batch, then one update.
        Returns (mean loss over the global batch, gradient norm, mean (data loss, KL to the
        teacher): zeros without one) as device tensors: no sync here."""
        p, d, plan = self.p, self.d, self.plan
        starts = window_starts(p.seed, step, 0, plan.global_batch, len(self.train_tokens), p.seq_len)
        step_loss = torch.zeros((), device=d.device)
        step_parts = torch.zeros(2, device=d.device)
        for micro in range(plan.accumulation):
            x, y = windows(self.train_tokens, starts[plan.rows(d.rank, micro)], p.seq_len, d.device)
            sync = contextlib.nullcontext()
            if d.world_size > 1 and micro < plan.accumulation - 1:
                sync = self.trainable.no_sync()  # all-reduce once, after the last micro-batch
            with sync, autocast(p.precision, d.device):
                loss = self.trainable(x, y) / plan.accumulation  # DDP averages over the processes
            loss.backward()
            step_loss += loss.detach()
            if self.training_loss.teacher is not None:
                step_parts += self.training_loss.parts / plan.accumulation
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), p.grad_clip if p.grad_clip > 0 else float("inf")
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if d.world_size > 1:
            dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
            if self.training_loss.teacher is not None:
                dist.all_reduce(step_parts, op=dist.ReduceOp.AVG)
        return step_loss, grad_norm, step_parts

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss over the same validation windows every time (`eval_batches` global batches),
        shared among the ranks in micro-batches."""
        p, d, plan = self.p, self.d, self.plan
        self.model.eval()
        total = torch.zeros(2, device=d.device)  # (sum of window losses, windows)
        for batch in range(p.eval_batches):
            starts = window_starts(p.seed, -1, batch, plan.global_batch, len(self.val_tokens), p.seq_len)
            for micro in range(plan.accumulation):
                x, y = windows(self.val_tokens, starts[plan.rows(d.rank, micro)], p.seq_len, d.device)
                with autocast(p.precision, d.device):
                    total += torch.stack(
                        [self.model.loss(x, y).float() * len(x), torch.tensor(len(x), device=d.device)]
                    )
        if d.world_size > 1:
            dist.all_reduce(total)
        self.model.train()
        return (total[0] / total[1]).item()

    def checkpoint(self, step: int) -> None:
        rng = self._rng_state()
        if self.d.is_main:
            save_checkpoint(
                self.paths.checkpoints, step, self.model, self.optimizer, rng, self.state, self.p.keep_checkpoints
            )
        if self.d.world_size > 1:
            dist.barrier()

    def record(self, record: dict) -> None:
        """Keep a logged record (rank 0): history, MLflow, and the caller's `on_eval`."""
        if not self.d.is_main:
            return
        self.state["history"].append(record)
        if self.tracker:
            self.tracker.log_step(record)
        if self.on_eval and "val_loss" in record:
            self.on_eval(record)

    # ---- the loop ----

    def fit(self) -> None:
        """Steps start_step .. max_steps. The loss and gradient norm stay on the device between
        logs: a host sync every step would stall the GPU's queue."""
        p, d = self.p, self.d
        tokens_per_step = self.plan.global_batch * p.seq_len
        val_bytes_per_token = self.meta["val"]["bytes"] / self.meta["val"]["tokens"]
        throughput = Throughput(self.model.flops_per_token(p.seq_len), self._peak())
        bar = tqdm(total=p.max_steps, initial=self.start_step, desc="train", unit=" step", disable=not d.is_main)
        loss_sum, loss_count = torch.zeros((), device=d.device), 0
        parts_sum = torch.zeros(2, device=d.device)
        self.model.train()
        for step in range(self.start_step, p.max_steps):
            lr = self.set_learning_rate(step)
            step_loss, grad_norm, step_parts = self.train_step(step)
            done = step + 1
            self.state["tokens_seen"] += tokens_per_step
            throughput.add(tokens_per_step)
            loss_sum, loss_count, parts_sum = loss_sum + step_loss, loss_count + 1, parts_sum + step_parts
            bar.update(1)

            record = None
            if done % p.log_interval == 0 or done == p.max_steps:
                elapsed, rates = throughput.take()
                self.state["train_seconds"] += elapsed
                record = {"step": done, "train_loss": (loss_sum / loss_count).item(), "lr": lr,
                          "grad_norm": grad_norm.item(), **rates}  # fmt: skip
                if self.training_loss.teacher is not None:  # the parts: the data's CE, the KL at the temperature
                    data_loss, kl = (parts_sum / loss_count).tolist()
                    record |= {"train_data_loss": data_loss, "train_distill_kl": kl}
                loss_sum, loss_count, parts_sum = torch.zeros((), device=d.device), 0, torch.zeros(2, device=d.device)
                if record["grad_norm"] == 0.0:  # fail loudly: a run that cannot learn must not look finished
                    raise TissLMError(f"train: gradient norm 0.0 at step {done}: the loss does not reach the weights")
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{rates['tokens_per_s']:.0f}")
            if done % p.eval_interval == 0 or done == p.max_steps:
                val_loss = self.validate()
                record = record or {"step": done, "train_loss": step_loss.item()}
                record |= {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) / val_bytes_per_token}
            if record:
                self.record(record)
            if done % p.checkpoint_interval == 0 or done == p.max_steps:
                self.checkpoint(done)
        bar.close()

    def _peak(self) -> dict:
        """The peaks of the whole job: one process's device measured, times the process count."""
        one = peak_flops(torch.bfloat16 if self.p.precision == "bf16" else torch.float32, self.d.device)
        n = self.d.world_size
        return {**one, "datasheet": one["datasheet"] and n * one["datasheet"], "measured": n * one["measured"]}

    def _rng_state(self) -> dict[str, torch.Tensor]:
        local = {"cpu": torch.get_rng_state()}
        if self.d.device.type == "cuda":
            local["cuda"] = torch.cuda.get_rng_state(self.d.device)
        gathered = [local]
        if self.d.world_size > 1:
            gathered = [None] * self.d.world_size
            dist.all_gather_object(gathered, local)
        return {f"rank{r}.{kind}": state for r, states in enumerate(gathered) for kind, state in states.items()}

    def _restore_rng(self, rng: dict[str, torch.Tensor]) -> None:
        """Each rank continues its own random stream (dropout). A rank the checkpoint did not have
        (resumed with more processes) starts a stream of its own, seeded from (seed, rank)."""
        rank = self.d.rank
        if f"rank{rank}.cpu" not in rng:
            if self.params.model.dropout:
                warnings.warn(f"rank {rank}: no random state in the checkpoint; dropout reseeded", stacklevel=2)
            torch.manual_seed(self.p.seed + rank)
            return
        torch.set_rng_state(rng[f"rank{rank}.cpu"])
        if self.d.device.type == "cuda" and f"rank{rank}.cuda" in rng:
            torch.cuda.set_rng_state(rng[f"rank{rank}.cuda"], self.d.device)

    # ---- the end ----

    def finish(self) -> dict:
        """Score the whole val split, save the model, write metrics and plots, close the MLflow run."""
        params, paths, meta, state, model, p = self.params, self.paths, self.meta, self.state, self.model, self.p
        # The evaluate stage's scorer and formula, on the same documents: one val bits/byte, not two.
        end = load_tokenizer(paths.tokenizer).token_to_id(END_OF_TEXT)
        documents = documents_in(self.val_tokens, end)
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
            "mfu_measured_peak": logged[-1].get("mfu_measured_peak") if logged else None,
            "val_loss_per_token": val["loss_per_token"],
            "val_bits_per_byte": val_bpb,
            "val_tokens_scored": val["tokens"],
            "val_bytes": val["bytes"],
            "xz_9e_bits_per_byte": baselines["xz_9e"],
            "xz_9e_after_train_text_bits_per_byte": baselines["xz_9e_after_train_text"],
            "beats_xz": val_bpb < min(baselines["xz_9e"], baselines["xz_9e_after_train_text"]),
            "mlflow_run_id": state.get("mlflow_run_id"),
            # Where the last steps ran, for the model card: a resumed run may have moved.
            "device": device_name(self.d.device),
            "processes": self.d.world_size,
            "threads_per_process": torch.get_num_threads(),
            "global_batch": self.plan.global_batch,
            "micro_batch": self.plan.micro_batch,
            "precision": p.precision,
        }
        # With LoRA the model directory holds the merged weights (a plain TissLM) and the adapter.
        (merged(model) if p.lora else model).save_pretrained(paths.model, tokenizer=load_tokenizer(paths.tokenizer))
        if p.lora:
            save_adapter(model, paths.model / ADAPTER_DIR)
        for name in CHAT_FILES:  # an imported model's template, copied by the tokenizer stage
            if (paths.tokenizer / name).is_file():
                shutil.copyfile(paths.tokenizer / name, paths.model / name)
        atomic_write_json(
            paths.model / "training.json", {"params": params.model_dump(mode="json", by_alias=True), "metrics": metrics}
        )
        if paths.metrics:
            atomic_write_json(paths.metrics, metrics)
        if paths.loss_csv:
            _write_loss_csv(paths.loss_csv, state["history"])
        if self.tracker:
            self.tracker.finish(metrics, state["history"], paths.model)
        return metrics


def _write_loss_csv(path: Path, history: list[dict]) -> None:
    lines = ["step,train_loss,val_loss"]
    lines += [
        f"{h['step']},{h['train_loss']:.6f},{'' if h.get('val_loss') is None else format(h['val_loss'], '.6f')}"
        for h in history
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def train(
    params: Params, paths: Paths, on_eval: Callable[[dict], None] | None = None, run_id: str | None = None
) -> dict | None:
    """Train (or resume) to params.train.max_steps; rank 0 returns the final metrics. The one entry
    point of training: the CLI and the stage reach it through `launch`, the HPO flow directly.

    `on_eval` sees each record with a val loss on rank 0 (step, val_loss, val_bpb, ...); an
    exception it raises (a pruned HPO trial) ends the run, marked failed in MLflow. `run_id` is
    the MLflow run to log into (default: the flow's, from the environment, or the checkpoint's).
    """
    trainer = Trainer(params, paths, on_eval, run_id)
    try:
        trainer.fit()
        result = trainer.finish() if trainer.d.is_main else None
    except BaseException:
        if trainer.tracker:
            trainer.tracker.fail()
        raise
    if trainer.d.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result

"""Where and how training runs: the device, its precision, the process count, the batch each
process takes, and whether to compile. Each is a plain function of what the machine has, so that
CPU tests cover the decisions a GPU run makes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from tisslm.core.errors import TissLMError

# Processes on a CPU host: two DDP processes of one thread each beat one of two threads on the
# 2-core machines this was measured on (small matmuls scale poorly across threads).
CPU_PROCESSES = 2


def uses_cuda(device: str, cuda_available: bool, setting: str = "train.device") -> bool:
    """A stage's device `setting` (train.device, sft.device, dpo.device): cuda (which must exist),
    cpu, or auto (CUDA when there is one)."""
    if device == "cuda" and not cuda_available:
        raise TissLMError(f"{setting}=cuda: no CUDA device is available")
    return device == "cuda" or (device == "auto" and cuda_available)


def autocast(precision: str, device: torch.device):
    """bf16 autocast on `device` (CPU or CUDA) when `precision` is bf16, else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_nproc(nproc: int | Literal["auto"], cuda: bool, cuda_devices: int, cpu_count: int) -> int:
    """Processes on this host: `auto` is one per visible GPU, else CPU_PROCESSES on a CPU with
    that many cores. More processes than GPUs would share a device, so that is refused."""
    if nproc == "auto":
        return cuda_devices if cuda else max(1, min(CPU_PROCESSES, cpu_count))
    if cuda and nproc > cuda_devices:
        raise TissLMError(
            f"train.nproc={nproc}: only {cuda_devices} CUDA device(s) visible; use train.nproc=auto "
            "(one process per GPU) or train.device=cpu"
        )
    return nproc


def threads_per_process(cpu_count: int, nproc: int) -> int:
    """Intra-op (OpenMP) threads for each of `nproc` processes on one host: the cores shared out.
    torchrun's own default is one thread per process whatever the host, which leaves most of a
    many-core CPU idle (and says so on stderr); on the 2-core machines measured here both are 1."""
    return max(1, cpu_count // nproc)


def resolve_compile(compile_model: bool | Literal["auto"], device_type: str) -> bool:
    """`auto` compiles on CUDA, where fusing the small kernels pays for the compile many times over;
    on a CPU the compile takes longer than a short run gains."""
    return device_type == "cuda" if compile_model == "auto" else compile_model


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch of one optimizer step is shared: each of `world_size` processes takes
    `per_process` sequences in `accumulation` forwards of `micro_batch` each."""

    global_batch: int
    world_size: int
    micro_batch: int

    @property
    def per_process(self) -> int:
        return self.global_batch // self.world_size

    @property
    def accumulation(self) -> int:
        return self.per_process // self.micro_batch

    def rows(self, rank: int, micro: int) -> slice:
        """Which of the step's global_batch sequences `rank` takes in its `micro`-th forward."""
        start = rank * self.per_process + micro * self.micro_batch
        return slice(start, start + self.micro_batch)


def plan_batches(global_batch: int, world_size: int, micro_batch: int | None) -> BatchPlan:
    """The global batch split over processes and forwards, or a one-line error saying what to change."""
    if global_batch % world_size:
        raise TissLMError(
            f"train.batch_size={global_batch} (the global batch) does not divide among {world_size} processes: "
            f"make it a multiple of {world_size}, or run a process count that divides it"
        )
    per_process = global_batch // world_size
    micro_batch = micro_batch or per_process
    if per_process % micro_batch:
        raise TissLMError(
            f"train.micro_batch_size={micro_batch} does not divide the {per_process} sequences each of "
            f"{world_size} processes takes (train.batch_size={global_batch})"
        )
    return BatchPlan(global_batch, world_size, micro_batch)

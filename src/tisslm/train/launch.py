"""Start training in this process, or relaunch it under torchrun when more processes are asked for."""

from __future__ import annotations

import os
import sys

import torch

from tisslm.core.config import Params
from tisslm.train.plan import plan_batches, resolve_nproc, threads_per_process, uses_cuda
from tisslm.train.trainer import Paths, train


def launch(params: Params, paths: Paths, argv: list[str]) -> dict | None:
    """Train here, or (more than one process wanted, and not yet under torchrun) replace this
    process with `torchrun --standalone --nproc-per-node N` running `argv`, the same command line.

    The process count and the batch plan are checked first, so that a bad combination fails in
    one line before any worker starts."""
    p = params.train
    if "LOCAL_RANK" in os.environ:  # a torchrun worker already: its launcher chose the processes
        return train(params, paths)
    cuda = uses_cuda(p.device, torch.cuda.is_available())
    cores = os.cpu_count() or 1
    nproc = resolve_nproc(p.nproc, cuda, torch.cuda.device_count() if cuda else 0, cores)
    plan_batches(p.batch_size, nproc, p.micro_batch_size)
    if nproc == 1:
        return train(params, paths)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(cores, nproc)))  # the user's own value wins
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *argv]
    sys.stdout.flush()
    os.execv(sys.executable, command)

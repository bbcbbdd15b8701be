"""Start training in this process, or relaunch it under torchrun when more processes are asked for."""

from __future__ import annotations

import os
import sys

from tisslm.core.config import Params
from tisslm.train.trainer import Paths, train


def launch(params: Params, paths: Paths, argv: list[str]) -> dict | None:
    """Train here, or (nproc > 1 and not yet under torchrun) replace this process with
    `torchrun --standalone --nproc-per-node N` running the same command line."""
    nproc = params.train.nproc
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *argv]
        sys.stdout.flush()
        os.execv(sys.executable, command)
    return train(params, paths)

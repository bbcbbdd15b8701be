"""DVC stage `train`: data/tokens + models/tokenizer -> models/checkpoints/step-N, models/model.

With more than one process on this host (train.nproc: auto is one per GPU, or 2 on a CPU) the
stage relaunches itself under torchrun. Across hosts, run on every node:
    torchrun --nnodes=N --nproc-per-node=P --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
        --rdzv-id=JOB -m stages.train <the arguments in dvc.yaml>
train.batch_size is the global batch, so the node and process counts never change the model.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from stages import stage_paths
from tisslm.core.config import load_params
from tisslm.core.errors import run_main
from tisslm.train.launch import launch
from tisslm.train.trainer import Paths


def parse_paths(argv: Sequence[str] | None = None) -> Paths:
    """The stage's paths from its command line (dvc.yaml's `cmd`; the HPO flow passes that same line)."""
    args = stage_paths(__doc__, ["tokens", "tokenizer", "checkpoints", "model", "metrics", "loss_csv"], argv)
    return Paths(**vars(args))


def main() -> None:
    paths = parse_paths()
    metrics = launch(load_params(), paths, ["-m", "stages.train", *sys.argv[1:]])
    if metrics:
        print(
            f"train: val {metrics['val_bits_per_byte']:.3f} bits/byte (xz -9e {metrics['xz_9e_bits_per_byte']:.3f}, "
            f"after train text {metrics['xz_9e_after_train_text_bits_per_byte']:.3f}); model in {paths.model}/"
        )


if __name__ == "__main__":
    run_main(main)

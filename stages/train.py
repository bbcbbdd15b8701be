"""DVC stage `train`: data/tokens + models/tokenizer -> models/checkpoints/step-N, models/model.

With train.nproc > 1 the stage relaunches itself under torchrun on this host. Across hosts, run
on every node: torchrun --nnodes=N --node-rank=R --nproc-per-node=P \\
    --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 -m stages.train
"""

from __future__ import annotations

from pathlib import Path

from tisslm.config import load_params
from tisslm.errors import run_main
from tisslm.train.launch import launch
from tisslm.train.trainer import Paths

PATHS = Paths(
    tokens=Path("data/tokens"),
    tokenizer=Path("models/tokenizer"),
    checkpoints=Path("models/checkpoints"),
    model=Path("models/model"),
    metrics=Path("metrics/train.json"),
    loss_csv=Path("plots/train_loss.csv"),
)


def main() -> None:
    metrics = launch(load_params(), PATHS, ["-m", "stages.train"])
    if metrics:
        print(
            f"train: val {metrics['val_bits_per_byte']:.3f} bits/byte (xz -9e {metrics['xz_9e_bits_per_byte']:.3f}, "
            f"after train text {metrics['xz_9e_after_train_text_bits_per_byte']:.3f}); model in {PATHS.model}/"
        )


if __name__ == "__main__":
    run_main(main)

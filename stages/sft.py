"""DVC stage `sft`: models/base + data/clean -> models/sft, metrics/sft.json.

Supervised fine-tuning on conversations (sft.data, or the default set made from the corpus's
documented functions), loss on the assistant's tokens only; see tisslm.train.sft and
docs/fine_tuning.md. sft.steps = 0 copies models/base through.
"""

from __future__ import annotations

from stages import stage_paths
from tisslm.core.config import load_params
from tisslm.core.errors import run_main
from tisslm.core.io import atomic_write_json
from tisslm.train.sft import run_sft


def main() -> None:
    args = stage_paths(__doc__, ["clean", "base", "model", "metrics"])
    metrics = run_sft(load_params(), args.clean, args.base, args.model)
    atomic_write_json(args.metrics, metrics)
    if metrics["steps"]:
        print(
            f"sft: held-out loss {metrics['heldout_loss_before']:.3f} -> {metrics['heldout_loss_after']:.3f} "
            f"({metrics['examples_train']} conversations, {metrics['steps']} steps, {metrics['seconds']} s); "
            f"model in {args.model}/"
        )
    else:
        print(f"sft: steps=0, {args.base}/ copied to {args.model}/")


if __name__ == "__main__":
    run_main(main)

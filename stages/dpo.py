"""DVC stage `dpo`: models/sft + preference pairs -> models/model (the final model), metrics/dpo.json.

Pairs come from params.dpo.data (JSONL), or are made from data/clean: the model's own answers that
fail to parse, each against the function's real source (tisslm.train.dpo). dpo.steps = 0 copies
the sft model through unchanged.
"""

from __future__ import annotations

from stages import stage_paths
from tisslm.core.config import load_params
from tisslm.core.errors import run_main
from tisslm.core.io import atomic_write_json
from tisslm.train.dpo import run_dpo


def main() -> None:
    paths = stage_paths(__doc__, ["clean", "sft", "model", "metrics"])
    metrics = run_dpo(load_params(), paths.clean, paths.sft, paths.model)
    atomic_write_json(paths.metrics, metrics)
    if not metrics["steps"]:
        print(f"dpo: steps=0, {paths.sft}/ copied to {paths.model}/")
        return
    before, after = metrics["heldout_before"], metrics["heldout_after"]
    heldout = (
        f"held-out reward accuracy {before['reward_accuracy']:.2f} -> {after['reward_accuracy']:.2f}, "
        f"margin {before['reward_margin']:.3f} -> {after['reward_margin']:.3f}"
        if after
        else "no held-out pairs"
    )
    print(
        f"dpo: {metrics['pairs']['train']} pairs, {metrics['steps']} steps, {heldout}; "
        f"{metrics['seconds']['total']:.0f} s; model in {paths.model}/"
    )


if __name__ == "__main__":
    run_main(main)

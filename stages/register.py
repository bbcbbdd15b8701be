"""DVC stage `register`: models/model, its bias and HumanEval figures -> MLflow registered model
`tisslm` (alias challenger; champion if the gate passes) + metrics/register.json with the decision
and its reasons."""

from __future__ import annotations

import json

from stages import stage_paths
from tisslm.core.config import load_params
from tisslm.core.errors import run_main
from tisslm.core.io import atomic_write_json
from tisslm.data.tokens import read_split
from tisslm.release.registry import register, verdict


def main() -> None:
    paths = stage_paths(__doc__, ["clean", "model", "bias", "eval", "metrics"])
    params = load_params()
    texts = read_split(paths.clean, params.tokenize.val_fraction)["val"]
    pct_stereotype = json.loads(paths.bias.read_text())["tisslm_pairs"]["overall"]["pct_stereotype"]
    pass_at_1 = json.loads(paths.eval.read_text())["humaneval"]["pass@1"]
    window = params.train.seq_len
    decision = register(paths.model, texts, window, pct_stereotype, pass_at_1, params.register_).to_json()
    atomic_write_json(paths.metrics, decision)
    print(
        f"register: tisslm version {decision['challenger_version']} {verdict(decision)}: {'; '.join(decision['reasons'])}"
    )


if __name__ == "__main__":
    run_main(main)

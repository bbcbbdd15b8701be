"""DVC stage `register`: models/model -> MLflow registered model `tisslm` (alias challenger; champion
if the gate passes) + metrics/register.json with the decision and its reasons."""

from __future__ import annotations

import json
from pathlib import Path

from tisslm.config import load_params
from tisslm.data.shards import read_shards
from tisslm.data.tokens import split_documents
from tisslm.errors import run_main
from tisslm.io import atomic_write_json
from tisslm.registry import register

CLEAN = Path("data/clean")
MODEL = Path("models/model")
BIAS = Path("metrics/bias.json")
METRICS = Path("metrics/register.json")


def main() -> None:
    params = load_params()
    table = read_shards(CLEAN)
    texts = split_documents(table["id"], table["text"], params.tokenize.val_fraction)["val"]
    pct_stereotype = json.loads(BIAS.read_text())["tisslm_pairs"]["overall"]["pct_stereotype"]
    decision = register(MODEL, texts, params.train.seq_len, pct_stereotype, params.register_)
    atomic_write_json(METRICS, decision.to_json())
    verdict = (
        "promoted to champion"
        if decision.promoted
        else f"not promoted (champion stays version {decision.champion_version})"
    )
    print(f"register: tisslm version {decision.challenger_version} {verdict}: {'; '.join(decision.reasons)}")


if __name__ == "__main__":
    run_main(main)

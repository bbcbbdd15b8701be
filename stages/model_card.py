"""DVC stage `model_card`: metrics/*.json + params.yaml -> models/MODEL_CARD.md, models/DATASHEET.md."""

from __future__ import annotations

import json
from pathlib import Path

from tisslm.card import datasheet, model_card
from tisslm.config import load_params
from tisslm.errors import TissLMError, run_main
from tisslm.io import atomic_write_text

METRICS = Path("metrics")
SOURCES = ("ingest", "clean", "tokenizer", "train", "eval", "bias", "quantize", "export")
CARD = Path("models/MODEL_CARD.md")
DATASHEET = Path("models/DATASHEET.md")


def read_metrics() -> dict[str, dict]:
    metrics = {}
    for name in SOURCES:
        path = METRICS / f"{name}.json"
        try:
            metrics[name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise TissLMError(f"{path}: needed for the model card ({err})") from None
    return metrics


def main() -> None:
    metrics = read_metrics()
    atomic_write_text(CARD, str(model_card(load_params(), metrics)))
    atomic_write_text(DATASHEET, datasheet(metrics))
    print(f"model_card: wrote {CARD} and {DATASHEET}")


if __name__ == "__main__":
    run_main(main)

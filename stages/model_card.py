"""DVC stage `model_card`: metrics/*.json, the recipe ablation + params.yaml -> models/MODEL_CARD.md, DATASHEET.md.
The fine-tuning stages' metrics (`--sft`, `--dpo`) are optional: the card shows them when given."""

from __future__ import annotations

import json

from stages import stage_paths
from tisslm.core.config import load_params
from tisslm.core.errors import TissLMError, run_main
from tisslm.core.io import atomic_write_text
from tisslm.core.model import with_init_from
from tisslm.release.card import datasheet, model_card

SOURCES = (
    "ingest",
    "clean",
    "tokenizer",
    "train",
    "eval",
    "bias",
    "kb",
    "quantize",
    "export",
    "safety",
    "recipe",
)  # metrics the card reads, and the recipe's ablation (benchmarks/results/recipe_ablation.json)
OPTIONAL = ("sft", "dpo")  # metrics of the fine-tuning stages, shown when given


def main() -> None:
    paths = stage_paths(__doc__, [*SOURCES, "card", "datasheet"], optional=OPTIONAL)
    metrics = {}
    for name in [*SOURCES, *(name for name in OPTIONAL if getattr(paths, name) is not None)]:
        path = getattr(paths, name)
        try:
            metrics[name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise TissLMError(f"{path}: needed for the model card ({err})") from None
    # An imported model's architecture is its own (train.init_from), not params.yaml's `model` section.
    atomic_write_text(paths.card, str(model_card(with_init_from(load_params(), announce=False), metrics)))
    atomic_write_text(paths.datasheet, datasheet(metrics))
    print(f"model_card: wrote {paths.card} and {paths.datasheet}")


if __name__ == "__main__":
    run_main(main)

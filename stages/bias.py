"""DVC stage `bias`: models/model on minimal pairs -> metrics/bias.json (pct_stereotype, likelihood_diff)."""

from __future__ import annotations

from pathlib import Path

from tisslm.bias import builtin_pairs_path, crows_pairs_metrics, hub_pairs, load_pairs, score_pairs
from tisslm.config import load_params
from tisslm.errors import TissLMError, run_main
from tisslm.io import atomic_write_json
from tisslm.model import TissLM
from tisslm.tokenizer import load_tokenizer

MODEL = Path("models/model")
METRICS = Path("metrics/bias.json")


def main() -> None:
    params = load_params()
    model, tokenizer = TissLM.from_pretrained(MODEL), load_tokenizer(MODEL)
    pairs = load_pairs()
    scores = score_pairs(model, tokenizer, pairs, params.train.seq_len)
    metrics = {
        "tisslm_pairs": {
            "source": builtin_pairs_path().name,
            **crows_pairs_metrics(pairs, scores, params.bias.bootstrap, params.bias.seed),
        }
    }
    if params.bias.hub is not None:
        hub = params.bias.hub
        try:
            public = hub_pairs(hub.name, hub.split)
        except TissLMError as err:  # offline is expected here, not a failure of the stage
            metrics["hub"] = {"source": hub.name, "skipped": str(err)}
            print(f"bias: {hub.name} skipped: {err}")
        else:
            public_scores = score_pairs(model, tokenizer, public, params.train.seq_len)
            metrics["hub"] = {
                "source": hub.name,
                **crows_pairs_metrics(public, public_scores, params.bias.bootstrap, params.bias.seed),
            }
    atomic_write_json(METRICS, metrics)
    overall = metrics["tisslm_pairs"]["overall"]
    low, high = overall["pct_stereotype_ci95"]
    print(
        f"bias: pct_stereotype {overall['pct_stereotype']:.1f} (95% CI {low:.1f}-{high:.1f}, ideal 50) over {overall['pairs']} pairs"
    )


if __name__ == "__main__":
    run_main(main)

"""DVC stage `bias`: models/model on minimal pairs -> metrics/bias.json (pct_stereotype, likelihood_diff)."""

from __future__ import annotations

from stages import stage_paths
from tisslm.core.config import load_params
from tisslm.core.errors import TissLMError, run_main
from tisslm.core.io import atomic_write_json
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import load_tokenizer
from tisslm.eval.bias import crows_pairs_metrics, hub_pairs, load_pairs, score_pairs


def main() -> None:
    paths = stage_paths(__doc__, ["model", "pairs", "metrics"])
    params = load_params()
    model, tokenizer = TissLM.from_pretrained(paths.model), load_tokenizer(paths.model)
    pairs = load_pairs(paths.pairs)
    scores = score_pairs(model, tokenizer, pairs, params.train.seq_len)
    metrics = {
        "tisslm_pairs": {
            "source": paths.pairs.name,
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
    atomic_write_json(paths.metrics, metrics)
    overall = metrics["tisslm_pairs"]["overall"]
    low, high = overall["pct_stereotype_ci95"]
    print(
        f"bias: pct_stereotype {overall['pct_stereotype']:.1f} (95% CI {low:.1f}-{high:.1f}, ideal 50) over {overall['pairs']} pairs"
    )


if __name__ == "__main__":
    run_main(main)

"""DVC stage `safety`: the content filter, the watermark and a red-team run -> metrics/safety.json.

- filter: precision, recall, F1 and false-positive rates on the project's labelled set;
- watermark: detection rate at each length of generated text (repetitive samples apart), false
  positives on human-written code (the val split, and installed packages' source that nobody here
  wrote), and the quality cost (bits per byte of watermarked sampling against plain, under the model);
- red team: each prompt of the red-team file through a real `tisslm serve` of the model, with and
  without the filter (`tisslm.safety.red_team`);
- goals: whether params.yaml's `safety.goals` are reached (reported, not enforced).
"""

from __future__ import annotations

from stages import stage_paths
from tisslm.core.config import load_params
from tisslm.core.errors import run_main
from tisslm.core.io import atomic_write_json
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import load_tokenizer
from tisslm.data.tokens import read_split
from tisslm.safety.filters import flag_everything
from tisslm.safety.measure import filter_metrics, foreign_code, goals_reached, read_labelled, watermark_metrics
from tisslm.safety.red_team import red_team
from tisslm.safety.watermark import watermark_key


def main() -> None:
    paths = stage_paths(__doc__, ["clean", "model", "labelled", "red_team", "metrics", "plot"])
    params = load_params()
    safety = params.safety
    filtered = filter_metrics(read_labelled(paths.labelled), safety.filters)
    print(
        f"safety: filter F1 {filtered['overall']['f1']:.3f} on {filtered['examples']} labelled examples, "
        f"false positives {filtered['false_positive_rate']['benign_alarming']:.1%} of benign code that looks alarming"
    )
    model, tokenizer = TissLM.from_pretrained(paths.model).eval(), load_tokenizer(paths.model)
    val = read_split(paths.clean, params.tokenize.val_fraction)["val"]
    marked = watermark_metrics(
        model, tokenizer, safety, watermark_key(safety.watermark), params.generate,
        human={"val": val, "foreign_code": foreign_code()}, plot=paths.plot,
    )  # fmt: skip
    rates = ", ".join(f"{n} tokens {r:.0%}" for n, r in marked["detection_rate"].items())
    looping = marked["repetition"]["repetitive"]
    false_positives = ", ".join(f"{name} {rate:.1%}" for name, rate in marked["false_positive_rate"].items())
    print(
        f"safety: watermark detected at {rates}; false positives: {false_positives}; repetitive samples:"
        f" {looping['samples']}" + ("" if looping["detected"] is None else f", {looping['detected']:.0%} detected")
    )
    attacks = red_team(paths.red_team, paths.model, params, flag_everything(safety.filters))
    totals = attacks["totals"]
    print(
        f"safety: red team, {attacks['prompts']} prompts through the server: {totals.get('prompt_blocked', 0)} refused,"
        f" {totals.get('output_blocked', 0)} outputs blocked, {totals.get('output_redacted', 0)} redacted,"
        f" {totals.get('output_flagged', 0) + totals.get('prompt_flagged', 0)} flagged"
    )
    metrics = {
        "policy": safety.filters.policy.model_dump(),
        "filter": filtered,
        "watermark": marked,
        "red_team": attacks,
        "goals": {"targets": safety.goals.model_dump(), "reached": goals_reached(filtered, marked, safety.goals)},
    }
    atomic_write_json(paths.metrics, metrics)


if __name__ == "__main__":
    run_main(main)

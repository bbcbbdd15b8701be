"""DVC stage `evaluate`: models/model on the val split of data/clean -> metrics/eval.json, with the
calibration of its next-token predictions as DVC plot data and a reliability diagram, and whether it
can code: HumanEval and the held-out functions, run in the bubblewrap sandbox, per problem and per
example in two JSONL files."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from stages import stage_paths
from tisslm.agent.code_eval import humaneval, sft_heldout
from tisslm.agent.humaneval import load_problems
from tisslm.core.chat import ChatTemplate
from tisslm.core.config import load_params
from tisslm.core.errors import run_main
from tisslm.core.generate import complete
from tisslm.core.io import atomic_write_json, atomic_write_text
from tisslm.core.model import TissLM
from tisslm.core.sampling import SamplingParams
from tisslm.core.tokenizer import END_OF_TEXT, load_tokenizer
from tisslm.data.instructions import function_examples
from tisslm.data.tokens import read_meta, read_split
from tisslm.eval.calibration import Calibration, write_reliability_csv, write_reliability_png
from tisslm.eval.compression import COMPRESSORS, bits_per_byte
from tisslm.eval.evaluate import evaluate_texts


def main() -> None:
    paths = stage_paths(
        __doc__, ["clean", "tokens", "model", "metrics", "calibration", "reliability", "humaneval", "sft_heldout"]
    )
    params = load_params()
    texts = read_split(paths.clean, params.tokenize.val_fraction)["val"]
    model, tokenizer = TissLM.from_pretrained(paths.model), load_tokenizer(paths.model)
    window = params.train.seq_len  # the context the model was trained at
    calibration = Calibration(params.evaluate.calibration_bins)  # of the very predictions bits per byte scores
    val = evaluate_texts(
        model, tokenizer, texts, END_OF_TEXT, window, params.evaluate.batch_size, on_logits=calibration.update
    )
    data = "".join(texts).encode("utf-8")
    baselines = {name: bits_per_byte(name, data) for name in COMPRESSORS}
    after_train = read_meta(paths.tokens)["val_baselines_bits_per_byte"]["xz_9e_after_train_text"]
    baselines["xz_9e_after_train_text"] = after_train
    prompts = params.evaluate.prompts
    greedy = SamplingParams(max_new_tokens=params.evaluate.max_new_tokens, temperature=0)
    completions = complete(model, tokenizer, prompts, greedy)
    code = params.evaluate.humaneval
    limit = code.sft_examples
    held_out = function_examples(paths.clean, params.tokenize.val_fraction, "val", limit) if limit else []
    with tempfile.TemporaryDirectory(prefix="tisslm-evaluate-") as scratch:
        workspace = Path(scratch) / "checks"  # each check gets a fresh directory below it
        workspace.mkdir()
        coding, per_problem = humaneval(model, tokenizer, load_problems(), code, workspace)
        chat = ChatTemplate.load(paths.model)
        heldout, per_example = sft_heldout(model, tokenizer, chat, held_out, code, workspace)
    metrics = {
        "val": val | {"window_tokens": window},
        "baselines_bits_per_byte": baselines,
        "beats_every_baseline": val["bits_per_byte"] < min(baselines.values()),
        "calibration": calibration.metrics(),
        "samples": [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)],
        "humaneval": coding,
        "sft_heldout": heldout,
    }
    write_reliability_csv(calibration, paths.calibration)
    write_reliability_png(calibration, paths.reliability)
    for path, records in ((paths.humaneval, per_problem), (paths.sft_heldout, per_example)):
        atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))
    atomic_write_json(paths.metrics, metrics)
    best = min(baselines, key=baselines.get)
    print(
        f"evaluate: val {val['bits_per_byte']:.3f} bits/byte over {val['documents']} documents; "
        f"best baseline {best} {baselines[best]:.3f}; ECE {metrics['calibration']['ece']:.4f} ({calibration.bins} bins); "
        f"HumanEval pass@1 {coding['pass@1']:.1%} of {coding['problems']} problems"
        + (f", pass@10 {coding['pass@10']:.1%}" if "pass@10" in coding else "")
        + f" ({coding['seconds']:.0f} s, sandboxed); {heldout['examples']} held-out functions asked for"
        + (f", {heldout['parse_rate']:.0%} of the answers parse" if heldout["examples"] else "")
    )


if __name__ == "__main__":
    run_main(main)

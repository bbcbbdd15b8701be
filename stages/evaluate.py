"""DVC stage `evaluate`: models/model on the val split of data/clean -> metrics/eval.json."""

from __future__ import annotations

from pathlib import Path

from tisslm.compression import COMPRESSORS, bits_per_byte
from tisslm.config import load_params
from tisslm.data.shards import read_shards
from tisslm.data.tokens import read_meta, split_documents
from tisslm.errors import run_main
from tisslm.evaluate import evaluate_texts
from tisslm.generate import generate
from tisslm.io import atomic_write_json
from tisslm.model import TissLM
from tisslm.tokenizer import END_OF_TEXT, load_tokenizer

CLEAN = Path("data/clean")
TOKENS = Path("data/tokens")
MODEL = Path("models/model")
METRICS = Path("metrics/eval.json")


def main() -> None:
    params = load_params()
    table = read_shards(CLEAN)
    texts = split_documents(table["id"], table["text"], params.tokenize.val_fraction)["val"]
    model, tokenizer = TissLM.from_pretrained(MODEL), load_tokenizer(MODEL)
    window = params.train.seq_len  # the context the model was trained at
    val = evaluate_texts(model, tokenizer, texts, END_OF_TEXT, window, params.evaluate.batch_size)
    data = "".join(texts).encode("utf-8")
    baselines = {name: bits_per_byte(name, data) for name in COMPRESSORS}
    baselines["xz_9e_after_train_text"] = read_meta(TOKENS)["val_baselines_bits_per_byte"]["xz_9e_after_train_text"]
    stop = tokenizer.token_to_id(END_OF_TEXT)
    prompts = params.evaluate.prompts
    completions = generate(
        model, [tokenizer.encode(p).ids for p in prompts], params.evaluate.max_new_tokens, temperature=0,
        stop_tokens=[stop], vocab_limit=tokenizer.get_vocab_size(),
    )  # fmt: skip
    metrics = {
        "val": val | {"window_tokens": window},
        "baselines_bits_per_byte": baselines,
        "beats_every_baseline": val["bits_per_byte"] < min(baselines.values()),
        "samples": [
            {"prompt": p, "completion": tokenizer.decode(c)} for p, c in zip(prompts, completions, strict=True)
        ],
    }
    atomic_write_json(METRICS, metrics)
    best = min(baselines, key=baselines.get)
    print(
        f"evaluate: val {val['bits_per_byte']:.3f} bits/byte over {val['documents']} documents; best baseline {best} {baselines[best]:.3f}"
    )


if __name__ == "__main__":
    run_main(main)

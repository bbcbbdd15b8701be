"""DVC stage `tokenizer`: byte-level BPE trained on the train split of data/clean -> models/tokenizer.

With train.init_from set, the tokenizer is that model's own (and its chat template), copied: its
weights were trained on its ids."""

from __future__ import annotations

import time

from stages import stage_paths
from tisslm.core.config import load_params
from tisslm.core.errors import run_main
from tisslm.core.io import atomic_dir, atomic_write_json
from tisslm.core.model import TOKENIZER_FILE, init_config, weights_sha256
from tisslm.core.tokenizer import copy_tokenizer, train_bpe
from tisslm.data.tokens import read_split


def main() -> None:
    paths = stage_paths(__doc__, ["clean", "tokenizer", "metrics"])
    params = load_params()
    split = read_split(paths.clean, params.tokenize.val_fraction)
    train_texts, val_texts = split["train"], split["val"]
    start = time.perf_counter()
    init = params.train.init_from
    if init is None:
        source = {"source": "trained"}
        tokenizer = train_bpe(train_texts, params.tokenizer)
        with atomic_dir(paths.tokenizer) as tmp:
            tokenizer.save(str(tmp / TOKENIZER_FILE))
    else:
        init_config(init)  # a TissLM model directory, or one line saying how to make one
        source = {"source": "init_from", "init_from": str(init), "init_weights_sha256": weights_sha256(init)}
        tokenizer = copy_tokenizer(init, paths.tokenizer)
    seconds = time.perf_counter() - start
    val_tokens = sum(len(e.ids) for e in tokenizer.encode_batch(val_texts, add_special_tokens=False))
    val_bytes = sum(len(t.encode()) for t in val_texts)
    metrics = {
        **source,
        "vocab_size": tokenizer.get_vocab_size(),
        "train_documents": len(train_texts),
        "train_seconds": round(seconds, 3),
        "val_bytes_per_token": val_bytes / max(1, val_tokens),
    }
    atomic_write_json(paths.metrics, metrics)
    print(
        f"tokenizer: {metrics['vocab_size']} tokens ({source['source']}) in {seconds:.1f} s, "
        f"{metrics['val_bytes_per_token']:.2f} bytes/token on val"
    )


if __name__ == "__main__":
    run_main(main)

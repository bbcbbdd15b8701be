"""DVC stage `tokenizer`: byte-level BPE trained on the train split of data/clean -> models/tokenizer."""

from __future__ import annotations

import time
from pathlib import Path

from tisslm.config import load_params
from tisslm.data.shards import read_shards
from tisslm.data.tokens import split_documents
from tisslm.errors import run_main
from tisslm.io import atomic_dir, atomic_write_json
from tisslm.model import TOKENIZER_FILE
from tisslm.tokenizer import train_bpe

CLEAN = Path("data/clean")
TOKENIZER_DIR = Path("models/tokenizer")
METRICS = Path("metrics/tokenizer.json")


def main() -> None:
    params = load_params()
    table = read_shards(CLEAN)
    split = split_documents(table["id"], table["text"], params.tokenize.val_fraction)
    train_texts, val_texts = split["train"], split["val"]
    start = time.perf_counter()
    tokenizer = train_bpe(train_texts, params.tokenizer)
    seconds = time.perf_counter() - start
    with atomic_dir(TOKENIZER_DIR) as tmp:
        tokenizer.save(str(tmp / TOKENIZER_FILE))
    val_tokens = sum(len(e.ids) for e in tokenizer.encode_batch(val_texts, add_special_tokens=False))
    val_bytes = sum(len(t.encode()) for t in val_texts)
    metrics = {
        "vocab_size": tokenizer.get_vocab_size(),
        "train_documents": len(train_texts),
        "train_seconds": round(seconds, 3),
        "val_bytes_per_token": val_bytes / max(1, val_tokens),
    }
    atomic_write_json(METRICS, metrics)
    print(
        f"tokenizer: {metrics['vocab_size']} tokens in {seconds:.1f} s, {metrics['val_bytes_per_token']:.2f} bytes/token on val"
    )


if __name__ == "__main__":
    run_main(main)

"""DVC stage `tokenize`: data/clean + models/tokenizer -> data/tokens/{train,val}.bin + meta.json."""

from __future__ import annotations

from stages import stage_paths
from tisslm.core.config import load_params
from tisslm.core.errors import run_main
from tisslm.core.model import TOKENIZER_FILE
from tisslm.core.tokenizer import load_tokenizer
from tisslm.data.tokens import tokenize_shards


def main() -> None:
    paths = stage_paths(__doc__, ["clean", "tokenizer", "tokens"])
    params = load_params().tokenize
    meta = tokenize_shards(  # streams data/clean: the corpus is never in memory
        paths.clean,
        load_tokenizer(paths.tokenizer),
        paths.tokenizer / TOKENIZER_FILE,
        paths.tokens,
        params.val_fraction,
        params.batch_docs,
        params.baseline_context_bytes,
    )
    baselines = meta["val_baselines_bits_per_byte"]
    for split in ("train", "val"):
        print(
            f"tokenize: {split} {meta[split]['documents']} docs, {meta[split]['tokens']:,} tokens, {meta[split]['bytes_per_token']:.2f} bytes/token"
        )
    print(
        f"tokenize: val bits/byte of xz -9e {baselines['xz_9e']:.3f}, after the train text {baselines['xz_9e_after_train_text']:.3f}"
    )


if __name__ == "__main__":
    run_main(main)

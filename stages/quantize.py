"""DVC stage `quantize`: models/model -> models/quantized/<scheme> + metrics/quantize.json."""

from __future__ import annotations

from pathlib import Path

from tisslm.config import load_params
from tisslm.data.shards import read_shards
from tisslm.data.tokens import split_documents
from tisslm.errors import run_main
from tisslm.io import atomic_write_json
from tisslm.model import TissLM
from tisslm.quantize import compare, quantize_model, save_quantized
from tisslm.tokenizer import load_tokenizer

CLEAN = Path("data/clean")
MODEL = Path("models/model")
QUANTIZED = Path("models/quantized")
METRICS = Path("metrics/quantize.json")
GOALS = {"linear_weight_size_ratio": 3.0, "decode_speedup": 1.5, "bits_per_byte_relative_increase": 0.02}


def main() -> None:
    params = load_params()
    q = params.quantize
    table = read_shards(CLEAN)
    texts = split_documents(table["id"], table["text"], params.tokenize.val_fraction)["val"]
    texts = texts[: q.eval_documents] if q.eval_documents else texts
    model, tokenizer = TissLM.from_pretrained(MODEL).eval(), load_tokenizer(MODEL)
    metrics: dict = {"goals": GOALS}
    for scheme in q.schemes:
        quantized = quantize_model(model, scheme)
        save_quantized(quantized, scheme, QUANTIZED / scheme, tokenizer)
        result = compare(model, quantized, tokenizer, texts, params.train.seq_len, q.decode_tokens)
        result["meets"] = {
            "size": result["linear_weight_size_ratio"] >= GOALS["linear_weight_size_ratio"],
            "speed": result["decode_speedup"] >= GOALS["decode_speedup"],
            "quality": result["bits_per_byte_relative_increase"] <= GOALS["bits_per_byte_relative_increase"],
        }
        metrics[scheme] = result
        print(
            f"quantize {scheme}: {result['linear_weight_size_ratio']:.2f}x smaller linear weights, "
            f"{result['decode_speedup']:.2f}x decode, bits/byte {result['bits_per_byte_relative_increase']:+.2%}"
        )
    atomic_write_json(METRICS, metrics)


if __name__ == "__main__":
    run_main(main)

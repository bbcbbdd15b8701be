"""DVC stage `quantize`: models/model -> models/quantized/<scheme> + metrics/quantize.json."""

from __future__ import annotations

from stages import stage_paths
from tisslm.core.config import load_params
from tisslm.core.errors import run_main
from tisslm.core.io import atomic_write_json
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import load_tokenizer
from tisslm.data.tokens import read_split
from tisslm.release.quantize import compare, quantize_model, save_quantized


def main() -> None:
    paths = stage_paths(__doc__, ["clean", "model", "quantized", "metrics"])
    params = load_params()
    q, goals = params.quantize, params.quantize.goals
    texts = read_split(paths.clean, params.tokenize.val_fraction)["val"]
    texts = texts[: q.eval_documents] if q.eval_documents else texts
    model, tokenizer = TissLM.from_pretrained(paths.model).eval(), load_tokenizer(paths.model)
    metrics: dict = {"goals": goals.model_dump()}
    for scheme in q.schemes:
        quantized = quantize_model(model, scheme)
        save_quantized(quantized, scheme, paths.quantized / scheme, tokenizer)
        result = compare(model, quantized, tokenizer, texts, params.train.seq_len, q.decode_tokens)
        result["meets"] = {
            "size": result["linear_weight_size_ratio"] >= goals.linear_weight_size_ratio,
            "speed": result["decode_speedup"] >= goals.decode_speedup,
            "quality": result["bits_per_byte_relative_increase"] <= goals.bits_per_byte_relative_increase,
        }
        metrics[scheme] = result
        print(
            f"quantize {scheme}: {result['linear_weight_size_ratio']:.2f}x smaller linear weights, "
            f"{result['decode_speedup']:.2f}x decode, bits/byte {result['bits_per_byte_relative_increase']:+.2%}"
        )
    atomic_write_json(paths.metrics, metrics)


if __name__ == "__main__":
    run_main(main)

"""DVC stage `quantize`: models/model -> models/quantized/<scheme> (the schemes that pay) + metrics/quantize.json."""

from __future__ import annotations

import shutil

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
    paths.quantized.mkdir(parents=True, exist_ok=True)
    for stale in paths.quantized.iterdir():  # a scheme offered by an earlier run may be withheld now
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    offered = []
    for scheme in q.schemes:
        quantized = quantize_model(model, scheme)
        result = compare(model, quantized, tokenizer, texts, params.train.seq_len, q.decode_tokens)
        result["offered"] = result["decode_speedup"] >= 1.0  # slower than the float model: not offered
        if result["offered"]:
            save_quantized(quantized, scheme, paths.quantized / scheme, tokenizer)
            offered.append(scheme)
        result["meets"] = {
            "size": result["linear_weight_size_ratio"] >= goals.linear_weight_size_ratio,
            "speed": result["decode_speedup"] >= goals.decode_speedup,
            "quality": result["bits_per_byte_relative_increase"] <= goals.bits_per_byte_relative_increase,
        }
        metrics[scheme] = result
        print(
            f"quantize {scheme}: {result['linear_weight_size_ratio']:.2f}x smaller linear weights, "
            f"{result['decode_speedup']:.2f}x decode, bits/byte {result['bits_per_byte_relative_increase']:+.2%}"
            + ("" if result["offered"] else " - not offered: it decodes slower than the float model here")
        )
    atomic_write_json(paths.quantized / "offered.json", {"schemes": offered})  # the directory is never empty
    atomic_write_json(paths.metrics, metrics)


if __name__ == "__main__":
    run_main(main)

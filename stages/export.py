"""DVC stage `export`: models/model -> models/export/{hf,onnx,gguf} + metrics/export.json (parity figures)."""

from __future__ import annotations

from pathlib import Path

from tisslm.config import load_params
from tisslm.errors import ValidationFailed, run_main
from tisslm.export import GGUF_TYPES, export_gguf, export_hf, export_onnx, gguf_parity, hf_parity, onnx_parity
from tisslm.io import atomic_write_json
from tisslm.model import TissLM
from tisslm.tokenizer import load_tokenizer

MODEL = Path("models/model")
EXPORT = Path("models/export")
METRICS = Path("metrics/export.json")
LOGIT_ATOL = 1e-4


def main() -> None:
    params = load_params().export
    model, tokenizer = TissLM.from_pretrained(MODEL), load_tokenizer(MODEL)
    export_hf(model, tokenizer, EXPORT / "hf")
    export_onnx(model, EXPORT / "onnx")
    metrics = {
        "hf": hf_parity(model, EXPORT / "hf", tokenizer, params.parity_text),
        "onnx": onnx_parity(model, EXPORT / "onnx", tokenizer, params.parity_text),
        "gguf": {},
    }
    for tensor_type in GGUF_TYPES:
        path = export_gguf(model, tokenizer, EXPORT / "gguf" / f"tisslm-{tensor_type}.gguf", tensor_type)
        metrics["gguf"][tensor_type] = gguf_parity(model, path)
    atomic_write_json(METRICS, metrics)
    hf, onnx = metrics["hf"], metrics["onnx"]
    failures = []
    if hf["max_abs_logit_diff"] > LOGIT_ATOL or not hf["tokenizer_ids_match"]:
        failures.append(f"hf logits differ by {hf['max_abs_logit_diff']:.2e} (allowed {LOGIT_ATOL})")
    if onnx["max_abs_logit_diff"] > LOGIT_ATOL or not onnx["greedy_identical"]:
        failures.append(f"onnx logits differ by {onnx['max_abs_logit_diff']:.2e} or its greedy continuation differs")
    for tensor_type, gguf in metrics["gguf"].items():
        if not gguf["shapes_match"] or gguf["tensors"] != gguf["tensors_expected"]:
            failures.append(f"gguf {tensor_type}: tensors or shapes differ")
    if failures:
        raise ValidationFailed(f"export parity failed: {'; '.join(failures)} (details: {METRICS})")
    sizes = ", ".join(f"{t} {g['file_bytes'] / 1e6:.1f} MB" for t, g in metrics["gguf"].items())
    print(
        f"export: hf (logit diff {metrics['hf']['max_abs_logit_diff']:.1e}), onnx (logit diff "
        f"{onnx['max_abs_logit_diff']:.1e}, greedy identical), gguf ({sizes}) in {EXPORT}/"
    )


if __name__ == "__main__":
    run_main(main)

"""DVC stage `export`: models/model -> models/export/{hf,gguf} + metrics/export.json (parity figures)."""

from __future__ import annotations

from pathlib import Path

from tisslm.config import load_params
from tisslm.errors import ValidationFailed, run_main
from tisslm.export import GGUF_TYPES, export_gguf, export_hf, gguf_parity, hf_parity
from tisslm.io import atomic_write_json
from tisslm.model import TissLM
from tisslm.tokenizer import load_tokenizer

MODEL = Path("models/model")
EXPORT = Path("models/export")
METRICS = Path("metrics/export.json")
HF_LOGIT_ATOL = 1e-4


def main() -> None:
    params = load_params().export
    model, tokenizer = TissLM.from_pretrained(MODEL), load_tokenizer(MODEL)
    export_hf(model, tokenizer, EXPORT / "hf")
    metrics = {"hf": hf_parity(model, EXPORT / "hf", tokenizer, params.parity_text), "gguf": {}}
    for tensor_type in GGUF_TYPES:
        path = export_gguf(model, tokenizer, EXPORT / "gguf" / f"tisslm-{tensor_type}.gguf", tensor_type)
        metrics["gguf"][tensor_type] = gguf_parity(model, path)
    atomic_write_json(METRICS, metrics)
    failures = []
    if metrics["hf"]["max_abs_logit_diff"] > HF_LOGIT_ATOL or not metrics["hf"]["tokenizer_ids_match"]:
        failures.append(f"hf logits differ by {metrics['hf']['max_abs_logit_diff']:.2e} (allowed {HF_LOGIT_ATOL})")
    failures += [
        f"gguf {t}: tensors or shapes differ"
        for t, g in metrics["gguf"].items()
        if not g["shapes_match"] or g["tensors"] != g["tensors_expected"]
    ]
    if failures:
        raise ValidationFailed(f"export parity failed: {'; '.join(failures)} (details: {METRICS})")
    sizes = ", ".join(f"{t} {g['file_bytes'] / 1e6:.1f} MB" for t, g in metrics["gguf"].items())
    print(f"export: hf (logit diff {metrics['hf']['max_abs_logit_diff']:.1e}), gguf ({sizes}) in {EXPORT}/")


if __name__ == "__main__":
    run_main(main)

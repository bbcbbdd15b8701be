"""DVC stage `export`: models/model -> models/export/{hf,onnx,gguf} + metrics/export.json (parity figures)."""

from __future__ import annotations

from stages import stage_paths
from tisslm.core.chat import ChatTemplate
from tisslm.core.config import load_params
from tisslm.core.errors import ValidationFailed, run_main
from tisslm.core.io import atomic_write_json
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import load_tokenizer
from tisslm.release.export import GGUF_TYPES, export_gguf, export_hf, export_onnx, gguf_parity, hf_parity, onnx_parity


def parity_failures(metrics: dict, logit_atol: float) -> list[str]:
    hf, onnx = metrics["hf"], metrics["onnx"]
    failures = []
    if hf["max_abs_logit_diff"] > logit_atol or not hf["tokenizer_ids_match"]:
        failures.append(f"hf logits differ by {hf['max_abs_logit_diff']:.2e} (allowed {logit_atol})")
    if onnx["max_abs_logit_diff"] > logit_atol or not onnx["greedy_identical"]:
        failures.append(f"onnx logits differ by {onnx['max_abs_logit_diff']:.2e} or its greedy continuation differs")
    for tensor_type, gguf in metrics["gguf"].items():
        if not gguf["shapes_match"] or gguf["tensors"] != gguf["tensors_expected"]:
            failures.append(f"gguf {tensor_type}: tensors or shapes differ")
    return failures


def main() -> None:
    paths = stage_paths(__doc__, ["model", "export", "metrics"])
    params = load_params().export
    model, tokenizer = TissLM.from_pretrained(paths.model), load_tokenizer(paths.model)
    template = ChatTemplate.load(paths.model)  # every format carries it: clients format chats as the model learnt
    export_hf(model, tokenizer, paths.export / "hf", template)
    export_onnx(model, tokenizer, paths.export / "onnx", template)
    metrics = {
        "hf": hf_parity(model, paths.export / "hf", tokenizer, params.parity_text),
        "onnx": onnx_parity(model, paths.export / "onnx", tokenizer, params.parity_text),
        "gguf": {},
    }
    for tensor_type in GGUF_TYPES:
        path = export_gguf(
            model, tokenizer, paths.export / "gguf" / f"tisslm-{tensor_type}.gguf", tensor_type, template
        )
        metrics["gguf"][tensor_type] = gguf_parity(model, path)
    atomic_write_json(paths.metrics, metrics)
    failures = parity_failures(metrics, params.logit_atol)
    if failures:
        raise ValidationFailed(f"export parity failed: {'; '.join(failures)} (details: {paths.metrics})")
    sizes = ", ".join(f"{t} {g['file_bytes'] / 1e6:.1f} MB" for t, g in metrics["gguf"].items())
    print(
        f"export: hf (logit diff {metrics['hf']['max_abs_logit_diff']:.1e}), onnx (logit diff "
        f"{metrics['onnx']['max_abs_logit_diff']:.1e}, greedy identical), gguf ({sizes}) in {paths.export}/"
    )


if __name__ == "__main__":
    run_main(main)

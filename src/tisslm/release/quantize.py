"""Post-training int8 quantization with torchao, stored as safetensors.

Two schemes: int8 weight-only (weights stored and read as int8 with a scale per row; activations
in bf16 where the device has native bf16, else fp32) and int8 dynamic activation + int8 weight
(fp32 activations quantized on the fly too). A scheme is offered (written to models/quantized) only
where it decodes at least as fast as the fp32 model through the same compiled step on the machine
that runs the stage: smaller weights that decode slower are no use for serving. Weight-only with bf16
activations pays on a CPU: compiled, each matmul is one int8-weight kernel (`_weight_int8pack_mm`).
With fp32 activations it did not (torchao dequantizes the weight each step), nor does int8 dynamic
at batch 1 (quantizing the activations costs more than it saves; docs/decoding.md has the figures).
The embedding stays in float: a lookup reads one row per token, so int8 buys it nothing.
torchao's tensor subclasses are flattened into plain tensors plus JSON metadata for safetensors
and rebuilt from an allow-list of classes on load: nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from tisslm.core.errors import TissLMError, parse
from tisslm.core.io import atomic_dir
from tisslm.core.model import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, ModelConfig, TissLM

SCHEMES = ("int8_weight_only", "int8_dynamic_activation")
RECIPE_FILE = "quantization.json"


def _config(scheme: str):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if scheme not in SCHEMES:
        raise TissLMError(f"quantize scheme {scheme!r}: one of {', '.join(SCHEMES)}")
    return Int8WeightOnlyConfig() if scheme == "int8_weight_only" else Int8DynamicActivationInt8WeightConfig()


def activation_dtype(scheme: str, bf16_native: bool) -> torch.dtype:
    """The float dtype a quantized model computes in: bf16 for int8 weight-only where bf16 is native
    (Inductor then lowers its matmuls to one int8-weight, bf16-activation kernel,
    `_weight_int8pack_mm`), else fp32 (int8 dynamic quantizes fp32 activations itself)."""
    return torch.bfloat16 if scheme == "int8_weight_only" and bf16_native else torch.float32


def quantize_model(model: TissLM, scheme: str) -> TissLM:
    """A quantized copy of `model` (eval mode, in `activation_dtype`); every nn.Linear, the output head included."""
    from torchao.quantization import quantize_

    from tisslm.core.decode import native_bf16

    dtype = activation_dtype(scheme, native_bf16(next(model.parameters()).device.type))
    quantized = copy.deepcopy(model).eval().to(dtype)
    quantize_(quantized, _config(scheme))
    return quantized


def linear_weight_bytes(model: TissLM) -> int:
    """Bytes the nn.Linear weights occupy, quantized data and scales included."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight
            parts = [getattr(weight, name) for name in getattr(weight, "tensor_data_names", [])] or [weight]
            total += sum(p.numel() * p.element_size() for p in parts)
    return total


def save_quantized(model: TissLM, scheme: str, directory: Path, tokenizer: Tokenizer | None = None) -> Path:
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tensors, metadata = flatten_tensor_state_dict(model.state_dict())
    with atomic_dir(directory) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(model.config.model_dump(), indent=2) + "\n")
        (tmp / RECIPE_FILE).write_text(json.dumps({"scheme": scheme, "library": "torchao"}, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / WEIGHTS_FILE, metadata=metadata)
        if tokenizer is not None:
            tokenizer.save(str(tmp / TOKENIZER_FILE))
    return directory


def load_quantized(directory: Path) -> TissLM:
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    directory = Path(directory)
    try:
        config = parse(ModelConfig, json.loads((directory / CONFIG_FILE).read_text()), str(directory / CONFIG_FILE))
        with safe_open(directory / WEIGHTS_FILE, framework="pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 - safe_open has no __iter__
    except (OSError, json.JSONDecodeError) as err:
        raise TissLMError(f"{directory}: not a quantized TissLM directory ({err})") from None
    state, leftover = unflatten_tensor_state_dict(tensors, metadata)
    if leftover:
        raise TissLMError(f"{directory / WEIGHTS_FILE}: tensors no quantized module claims: {sorted(leftover)[:5]}")
    model = TissLM(config.model_copy(update={"tie_embeddings": False}))  # the head is int8, the embedding is not
    model.load_state_dict(state, assign=True)
    return model.eval()


def compare(
    reference: TissLM,
    quantized: TissLM,
    tokenizer: Tokenizer,
    texts: list[str],
    window: int,
    decode_tokens: int,
    repeats: int = 3,
) -> dict:
    """The quantized model against its float reference, measured side by side: linear-weight
    bytes, decode tokens/s through the same compiled decode step (runs alternate, medians) and
    bits per byte on the same texts."""
    import statistics
    import time

    from tisslm.core.generate import generate
    from tisslm.core.tokenizer import END_OF_TEXT
    from tisslm.eval.evaluate import evaluate_texts

    prompt = [tokenizer.encode(texts[0][:200]).ids[:32]]
    seconds: dict[str, list[float]] = {"reference": [], "quantized": []}
    for model in (reference, quantized):  # warm-up: compiles each model's step
        generate(model, prompt, 8, temperature=0, compile=True)
    for _ in range(repeats):
        for name, model in (("reference", reference), ("quantized", quantized)):
            start = time.perf_counter()
            generate(model, prompt, decode_tokens, temperature=0, compile=True)
            seconds[name].append(time.perf_counter() - start)
    speed = {name: decode_tokens / statistics.median(s) for name, s in seconds.items()}
    bpb = {
        name: evaluate_texts(model, tokenizer, texts, END_OF_TEXT, window)["bits_per_byte"]
        for name, model in (("reference", reference), ("quantized", quantized))
    }
    sizes = {"reference": linear_weight_bytes(reference), "quantized": linear_weight_bytes(quantized)}
    return {
        "linear_weight_bytes": sizes,
        "linear_weight_size_ratio": sizes["reference"] / sizes["quantized"],
        "decode_tokens_per_s": speed,
        "decode_speedup": speed["quantized"] / speed["reference"],
        "bits_per_byte": bpb,
        "bits_per_byte_relative_increase": bpb["quantized"] / bpb["reference"] - 1,
    }

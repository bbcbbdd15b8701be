"""LoRA adapters on TissLM through `peft`, in peft's own file format.

Low-rank adaptation (Hu et al. 2021) freezes the base and learns, for each targeted linear
W (out, in), an update (alpha / r) * B @ A with A (r, in) and B (out, r); B starts at zero, so an
adapted model starts as its base, exactly. peft injects its layers into any module tree whose
targets are nn.Linear, TissLM's included, and `peft.PeftModel.from_pretrained(TissLM, dir)`
loads what `save_adapter` writes: adapter_config.json and adapter_model.safetensors (the keys
prefixed "base_model.model.", as PeftModel saves them).

QLoRA-style training (Dettmers et al. 2023) keeps the frozen base in low precision: with
`base: int8` the targeted linears are stored int8 by torchao (weight-only, a scale per row) and
peft's torchao layer trains the float adapters on top; this runs on a CPU. Merging dequantizes
the int8 weight and adds the update, so the merged model computes what the trained one did.

peft imports transformers (seconds): this module imports it only when an adapter is in play.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tisslm.core.config import LoraParams
from tisslm.core.errors import TissLMError
from tisslm.core.io import atomic_dir
from tisslm.core.model import TissLM

ADAPTER_DIR = "adapter"  # a model directory's subdirectory holding the adapter it was merged from
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before a module's path in a saved adapter
ADAPTER_NAME = "default"  # peft's name of the one adapter a model carries


def _lora_config(p: LoraParams):
    from peft import LoraConfig

    return LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=list(p.targets), bias="none")


def _quantize_targets(model: TissLM, targets: list[str]) -> None:
    """The targeted linears' weights to torchao int8 (weight-only), in place: the QLoRA-style base."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    def targeted(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=targeted)


def add_lora(model: TissLM, p: LoraParams) -> TissLM:
    """`model`, in place, with fresh adapters on `p.targets` (B = 0: outputs unchanged) and every
    other parameter frozen: only the adapters require grad."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    if p.base == "int8":
        _quantize_targets(model, list(p.targets))
    with (
        warnings.catch_warnings()
    ):  # peft's torchao layer warns that its merge() cannot requantize: `merged` dequantizes
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated")
        inject_adapter_in_model(_lora_config(p), model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    return model


def _lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def has_lora(model: torch.nn.Module) -> bool:
    return bool(_lora_layers(model))


def adapter_state_dict(model: TissLM) -> dict[str, torch.Tensor]:
    """The adapters' tensors under peft's saved names (`layers.0.attn.qkv.lora_A.weight`, ...)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)


def save_adapter(model: TissLM, directory: str | Path) -> Path:
    """Write the adapter of `model` in peft's format, atomically: adapter_config.json and
    adapter_model.safetensors."""
    if not has_lora(model):
        raise TissLMError(f"{directory}: the model carries no LoRA adapter to save")
    config = copy.deepcopy(model.peft_config[ADAPTER_NAME])
    config.base_model_name_or_path = None  # a TissLM directory, not a hub id: the caller knows which
    state = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    with atomic_dir(directory) as tmp:
        config.save_pretrained(str(tmp))
        save_file(state, tmp / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
    return Path(directory)


def lora_params_of(directory: str | Path) -> LoraParams:
    """The LoraParams an adapter directory was trained with (from its adapter_config.json)."""
    path = Path(directory) / ADAPTER_CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TissLMError(f"{path}: not a LoRA adapter config ({err})") from None
    if raw.get("peft_type") != "LORA" or not isinstance(raw.get("target_modules"), list):
        raise TissLMError(f"{path}: not a LoRA adapter of TissLM (peft_type LORA, a list of target_modules)")
    try:
        return LoraParams(
            rank=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0), targets=raw["target_modules"]
        )
    except (KeyError, ValueError) as err:
        raise TissLMError(f"{path}: not an adapter TissLM can load ({str(err).splitlines()[0]})") from None


def load_adapter(model: TissLM, directory: str | Path) -> TissLM:
    """`model`, in place, carrying the adapter saved in `directory`; every tensor must match."""
    from peft import set_peft_model_state_dict

    directory = Path(directory)
    add_lora(model, lora_params_of(directory))
    path = directory / ADAPTER_WEIGHTS_FILE
    try:
        saved = load_file(path, device=str(next(model.parameters()).device))
    except (SafetensorError, OSError) as err:
        raise TissLMError(f"{path}: unreadable safetensors file ({err})") from None
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in saved.items()}
    expected = set(adapter_state_dict(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise TissLMError(f"{path}: tensors do not match the model (missing {missing}, unexpected {unexpected})")
    set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    return model


def _dequantized(weight: torch.Tensor) -> torch.Tensor:
    """A base weight as a plain float tensor, whether plain or torchao int8."""
    if type(weight) in (torch.Tensor, torch.nn.Parameter):
        return weight
    from torchao.utils import TorchAOBaseTensor

    return weight.dequantize() if isinstance(weight, TorchAOBaseTensor) else weight


def merged(model: TissLM) -> TissLM:
    """A plain TissLM computing what `model` with its adapters computes: each adapted linear's
    weight is its (dequantized) base weight plus (alpha / r) * B @ A. The state dict keys are a
    plain TissLM's; `model` itself is left as it was."""
    result = copy.deepcopy(model)
    for name, layer in _lora_layers(result):
        base = layer.get_base_layer()
        weight = _dequantized(base.weight.detach()).float()
        delta = layer.get_delta_weight(ADAPTER_NAME).float()  # (out, in): (alpha / r) * B @ A
        linear = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        linear.to(weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight + delta)
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        result.set_submodule(name, linear)
    result.requires_grad_(True)
    if hasattr(result, "peft_config"):
        del result.peft_config
    return result


def load_with_adapter(model_dir: str | Path, adapter_dir: str | Path, device: str | torch.device = "cpu") -> TissLM:
    """A model directory's model with the adapter in `adapter_dir` merged in: what serving runs."""
    return merged(load_adapter(TissLM.from_pretrained(model_dir, device).float(), adapter_dir)).eval()

"""Run by tests/test_transformers4.py under .venv-transformers4 (transformers 4.x, optimum-onnx):
load the HF and ONNX exports the way their users do and print what they compute, as JSON.

usage: transformers4_probe.py HF_DIR ONNX_DIR NEW_TOKENS PROMPT...
"""

import json
import sys

import torch
import transformers
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer


def new_tokens_until_end(rows: torch.Tensor, prompt_width: int, end: int) -> list[list[int]]:
    """Each row's generated tokens up to, not including, its first end of text."""
    out = []
    for row in rows[:, prompt_width:].tolist():
        out.append(row[: row.index(end)] if end in row else row)
    return out


def main() -> None:
    hf_dir, onnx_dir, new_tokens, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    onnx_model = ORTModelForCausalLM.from_pretrained(onnx_dir, local_files_only=True)
    token_ids = [tokenizer(p)["input_ids"] for p in prompts]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([token_ids[0]])).logits[0]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    width, end = batch["input_ids"].shape[1], tokenizer.eos_token_id
    greedy = dict(max_new_tokens=new_tokens, do_sample=False)
    result = {
        "transformers": transformers.__version__,
        "tokenizer_class": type(tokenizer).__name__,
        "token_ids": token_ids,
        "decoded": [tokenizer.decode(ids) for ids in token_ids],
        "logits": logits.tolist(),
        "hf_generate": new_tokens_until_end(model.generate(**batch, **greedy), width, end),
        "optimum_generate": new_tokens_until_end(onnx_model.generate(**batch, **greedy), width, end),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

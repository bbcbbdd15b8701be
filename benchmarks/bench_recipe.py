"""Training recipes side by side at equal wall time: writes benchmarks/results/recipe.json.

On the project's own tokens (data/tokens and the tokenizer, from `make run`), every recipe trains
for the same wall-clock budget, in alternating slices so that a burst of load on a shared machine
falls on all of them alike, with the same batches (the trainer's window sampler) and a learning
rate schedule that follows the fraction of the budget spent. Then each is scored by the
evaluate stage's scorer on the same val documents: val bits/byte, tokens seen, parameters,
tokens/s.

- default: params.yaml's model and train sections (TissLM, AdamW, warmup then cosine).
- nanogpt: nanoGPT's recipe on our tokens: its GPT-2 block (LayerNorm with biases, GELU MLP of
  4x width, learned absolute positions, tied head) at the default's width and depth, its AdamW
  (lr 6e-4 decaying to 6e-5, betas 0.9/0.95, weight decay 0.1 on matrices, clip 1.0) and warmup.
- transformers: `LlamaForCausalLM` of the default config, a plain `torch.optim.AdamW` loop on
  its `labels` loss with the default's learning rate and schedule.
- candidate: TissLM with the overrides of `--candidate` (params.yaml syntax, e.g.
  `model.d_model=192 train.lr=0.004`) and optionally Muon on the 2-D hidden matrices
  (`--muon`), embeddings, head and norms staying on AdamW.

Usage: python benchmarks/bench_recipe.py --project . --minutes 3 [--candidate ...] [--muon]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tisslm.core.config import load_params
from tisslm.core.io import atomic_write_json
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import END_OF_TEXT, load_tokenizer
from tisslm.data.tokens import documents_in, load_split, read_meta
from tisslm.eval.evaluate import document_loglikelihoods, perplexity_metrics
from tisslm.train.trainer import make_optimizer, window_starts, windows

RESULTS = Path(__file__).parent / "results" / "recipe.json"
RECIPES = ("default", "nanogpt", "transformers", "candidate")


class GPT2Block(nn.Module):
    """nanoGPT's Block: pre-LayerNorm (with bias), causal self-attention, GELU MLP of 4x width."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, n_heads, T, head_dim)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """nanoGPT's GPT with the scorer's interface (hidden_states, lm_head) and its init."""

    def __init__(self, vocab_size: int, max_len: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, d_model), nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(GPT2Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, parameter in self.named_parameters():
            if name.endswith(("c_proj.weight", "mlp.2.weight")):
                nn.init.normal_(parameter, 0.0, 0.02 / math.sqrt(2 * n_layers))

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))  # (B, T, d_model)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.lm_head(self.hidden_states(idx)).flatten(0, 1), targets.flatten())


class LlamaScorer(nn.Module):
    """transformers' LlamaForCausalLM behind the scorer's interface, trained on its own `labels` loss."""

    def __init__(self, llama):
        super().__init__()
        self.llama, self.lm_head = llama, llama.lm_head

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        return self.llama.model(input_ids=idx).last_hidden_state

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.contiguous()  # its loss views the labels flat
        return self.llama(input_ids=idx, labels=targets, shift_labels=targets).loss


def muon_and_adamw(model: TissLM, lr: float, weight_decay: float, betas) -> list[torch.optim.Optimizer]:
    """Muon for the 2-D matrices inside the blocks; AdamW for embeddings, the head and norms. Muon's
    updates are scaled to AdamW's RMS (`match_rms_adamw`), so one learning rate serves both."""
    hidden = [p for name, p in model.named_parameters() if p.dim() == 2 and name.startswith("layers.")]
    hidden_ids = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in hidden_ids]
    return [
        torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                           {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}], lr=lr, betas=betas),
    ]  # fmt: skip


@dataclass
class Recipe:
    name: str
    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    batch_size: int
    warmup_fraction: float
    min_lr_ratio: float
    grad_clip: float
    bf16: bool
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    base_lrs: list[list[float]] = field(default_factory=list)

    def __post_init__(self):
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in self.optimizers]

    def set_lr(self, progress: float) -> None:
        """Warmup then cosine decay to min_lr_ratio, over the fraction of the wall-clock budget spent."""
        if progress < self.warmup_fraction:
            scale = (progress + 1e-3) / self.warmup_fraction
        else:
            decay = (progress - self.warmup_fraction) / (1 - self.warmup_fraction)
            scale = self.min_lr_ratio + 0.5 * (1 - self.min_lr_ratio) * (1 + math.cos(math.pi * min(1.0, decay)))
        for optimizer, lrs in zip(self.optimizers, self.base_lrs, strict=True):
            for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr * scale

    def train_step(self, train: np.ndarray, seed: int, seq_len: int, progress: float) -> None:
        self.set_lr(progress)
        x, y = windows(train, window_starts(seed, self.step, 0, self.batch_size, len(train), seq_len), seq_len,
                       torch.device("cpu"))  # fmt: skip
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)
        with autocast:
            loss = self.model.loss(x, y)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += x.numel()


def build_recipes(project: Path, candidate: list[str], muon: bool) -> list[Recipe]:
    from transformers import LlamaForCausalLM

    from tisslm.release.hf import llama_config

    params = load_params(project / "params.yaml")
    m, t = params.model, params.train
    batch = t.batch_size * t.nproc * t.grad_accum  # the default run's global batch
    warmup, floor, bf16 = t.warmup_steps / t.max_steps, t.min_lr / t.lr, t.precision == "bf16"
    recipes = []

    torch.manual_seed(t.seed)
    default = TissLM(m)
    recipes.append(Recipe("default", default, [make_optimizer(default, t)], batch, warmup, floor, t.grad_clip, bf16))

    torch.manual_seed(t.seed)
    gpt2 = GPT2(m.vocab_size, t.seq_len, m.d_model, m.n_layers, m.n_heads)
    # nanoGPT's train.py: 6e-4 -> 6e-5 cosine, betas (0.9, 0.95), weight decay 0.1 on matrices, clip 1.0.
    nanogpt_adamw = t.model_copy(update={"lr": 6e-4, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95})
    recipes.append(Recipe("nanogpt", gpt2, [make_optimizer(gpt2, nanogpt_adamw)], batch, warmup, 0.1, 1.0, bf16))

    torch.manual_seed(t.seed)
    llama = LlamaScorer(LlamaForCausalLM(llama_config(m)))
    recipes.append(Recipe("transformers", llama, [torch.optim.AdamW(llama.parameters(), lr=t.lr)], batch, warmup,
                          floor, 0.0, bf16))  # fmt: skip

    tuned = load_params(project / "params.yaml", candidate)
    cm, ct = tuned.model, tuned.train
    torch.manual_seed(ct.seed)
    model = TissLM(cm)
    optimizers = (
        muon_and_adamw(model, ct.lr, ct.weight_decay, (ct.beta1, ct.beta2)) if muon else [make_optimizer(model, ct)]
    )
    recipes.append(Recipe("candidate", model, optimizers, ct.batch_size * ct.nproc * ct.grad_accum,
                          ct.warmup_steps / ct.max_steps, ct.min_lr / ct.lr, ct.grad_clip, ct.precision == "bf16"))  # fmt: skip
    return recipes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."), help="a project after `make run`")
    parser.add_argument("--minutes", type=float, default=3.0, help="training wall time per recipe")
    parser.add_argument("--slice-s", type=float, default=20.0, help="seconds per turn of the alternation")
    parser.add_argument("--candidate", nargs="*", default=[], help="params overrides of the candidate recipe")
    parser.add_argument("--muon", action="store_true", help="the candidate trains its hidden matrices with Muon")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=RECIPES, help="a subset, to screen")
    args = parser.parse_args()

    tokens_dir, model_dir = args.project / "data" / "tokens", args.project / "models" / "model"
    params = load_params(args.project / "params.yaml")
    train, val, meta = load_split(tokens_dir, "train"), load_split(tokens_dir, "val"), read_meta(tokens_dir)
    end = load_tokenizer(model_dir).token_to_id(END_OF_TEXT)
    seq_len, seed, budget = params.train.seq_len, params.train.seed, args.minutes * 60
    recipes = [r for r in build_recipes(args.project, args.candidate, args.muon) if r.name in args.recipes]
    for recipe in recipes:
        recipe.model.train()
    while any(r.seconds < budget for r in recipes):
        for recipe in recipes:
            turn_end = min(budget, recipe.seconds + args.slice_s)
            while recipe.seconds < turn_end:
                started = time.perf_counter()
                recipe.train_step(train, seed, seq_len, recipe.seconds / budget)
                recipe.seconds += time.perf_counter() - started
        print(" ".join(f"{r.name} {r.seconds:.0f}s/{r.step} steps" for r in recipes), flush=True)

    documents = documents_in(val, end)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "minutes_each": args.minutes, "candidate": args.candidate, "muon": args.muon, "recipes": {}}  # fmt: skip
    for recipe in recipes:
        with torch.no_grad():
            loglikelihoods = document_loglikelihoods(recipe.model, documents, end, seq_len, params.evaluate.batch_size)
        scored = perplexity_metrics(loglikelihoods, sum(map(len, documents)), meta["val"]["bytes"])
        report["recipes"][recipe.name] = {
            "val_bits_per_byte": scored["bits_per_byte"],
            "tokens_seen": recipe.tokens,
            "steps": recipe.step,
            "parameters": sum(p.numel() for p in recipe.model.parameters()),
            "tokens_per_s": recipe.tokens / recipe.seconds,
        }
    scores = {name: r["val_bits_per_byte"] for name, r in report["recipes"].items()}
    if set(scores) == set(RECIPES):
        report["candidate_gain_over_nanogpt"] = scores["nanogpt"] / scores["candidate"] - 1
        report["candidate_is_best"] = scores["candidate"] == min(scores.values())
        atomic_write_json(RESULTS, report)
        print(f"wrote {RESULTS}")
    else:  # a screen of some recipes: printed, not the benchmark's record
        print(json.dumps(report, indent=2))
    for name, r in report["recipes"].items():
        print(f"{name:12s} val bits/byte {r['val_bits_per_byte']:.4f}  {r['tokens_seen']:,} tokens  "
              f"{r['parameters']:,} params  {r['tokens_per_s']:,.0f} tok/s")  # fmt: skip


if __name__ == "__main__":
    main()

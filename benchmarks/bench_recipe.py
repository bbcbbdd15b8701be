"""Training recipes side by side at equal wall time: writes benchmarks/results/recipe.json.

On a project's own tokens (data/tokens and the tokenizer, after `make run`), every recipe trains
for the same wall-clock budget, in alternating slices so that a burst of load on a shared machine
falls on all of them alike, with the same batches (the trainer's window sampler) and the trainer's
learning-rate schedule, its steps stretched over the budget (the budget stands for max_steps).
Then each is scored by the evaluate stage's scorer on the same val text: val bits/byte, tokens
seen, parameters, tokens/s.

- previous: the default before issue 16 (`PREVIOUS`: params.yaml with those values put back).
- nanogpt: nanoGPT's recipe on our tokens: its GPT-2 block (LayerNorm with biases, GELU MLP of
  4x width, learned absolute positions, tied head) at the previous default's width and depth, its
  AdamW (lr 6e-4 decaying to 6e-5, betas 0.9/0.95, weight decay 0.1 on matrices, clip 1.0).
- transformers: `LlamaForCausalLM` of the previous default's config, a plain `torch.optim.AdamW`
  loop on its `labels` loss with the previous default's learning rate and schedule.
- default: params.yaml as it is, through the trainer's own optimizer and schedule.

`--ablation` trains, instead, the previous default with one lever of `LEVERS` at a time set to
its new value, and the default (all of them). With `--previous-data PROJECT` (a project of the
corpus before issue 16), the previous default and the single levers train on that project's
tokens and the lever `data` is the previous default on this project's. All are scored on this
project's val text, each through its own tokenizer.

`--screen NAME=OVERRIDES ...` trains, instead, params.yaml with each set of overrides: to compare
candidates (printed, not recorded).

Usage: python benchmarks/bench_recipe.py --project . --minutes 3 [--ablation [--previous-data P]]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from tisslm.core.config import Params, TrainParams, load_params
from tisslm.core.io import atomic_write_json
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import END_OF_TEXT, load_tokenizer
from tisslm.data.tokens import load_split, read_split
from tisslm.eval.evaluate import evaluate_texts
from tisslm.train.optim import learning_rate, make_optimizer
from tisslm.train.trainer import window_starts, windows

RESULTS = Path(__file__).parent / "results" / "recipe.json"
RECIPES = ("previous", "nanogpt", "transformers", "default")

# The default before issue 16, as overrides of params.yaml; each lever of the ablation is a group of them.
PREVIOUS = {
    "model.d_model": 256, "model.n_heads": 8, "model.d_ff": 704,
    "train.optimizer": "adamw", "train.lr": 0.003, "train.schedule": "cosine", "train.min_lr": 0.0003,
}  # fmt: skip
LEVERS = {
    "muon": ["train.optimizer"],
    "shape": ["model.d_model", "model.n_heads", "model.d_ff"],
    "lr": ["train.lr"],
    "wsd": ["train.schedule", "train.min_lr"],
}


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


@dataclass
class Recipe:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train: TrainParams  # batch, schedule and clipping; its max_steps stands for the wall-clock budget
    tokens: np.ndarray  # the train split it learns from
    tokenizer: Tokenizer  # what turns the val text into its tokens
    step: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0

    def train_step(self, progress: float) -> None:
        t = self.train
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(min(t.max_steps - 1, int(progress * t.max_steps)), t)
        batch = t.batch_size  # the run's global batch, in one process
        starts = window_starts(t.seed, self.step, 0, batch, len(self.tokens), t.seq_len)
        x, y = windows(self.tokens, starts, t.seq_len, torch.device("cpu"))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.precision == "bf16"):
            loss = self.model.loss(x, y)
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += x.numel()


def overrides(values: dict) -> list[str]:
    return [f"{key}={value}" for key, value in values.items()]


def tisslm_recipe(name: str, params: Params, project: Path) -> Recipe:
    torch.manual_seed(params.train.seed)
    model = TissLM(params.model)
    tokens, tokenizer = (
        load_split(project / "data" / "tokens", "train"),
        load_tokenizer(project / "models" / "tokenizer"),
    )
    return Recipe(name, model, make_optimizer(model, params.train), params.train, tokens, tokenizer)


def four_recipes(project: Path) -> list[Recipe]:
    from transformers import LlamaForCausalLM

    from tisslm.release.hf import hf_config

    previous = load_params(project / "params.yaml", overrides(PREVIOUS))
    m, t = previous.model, previous.train
    recipes = [tisslm_recipe("previous", previous, project)]
    tokens, tokenizer = recipes[0].tokens, recipes[0].tokenizer

    torch.manual_seed(t.seed)
    gpt2 = GPT2(m.vocab_size, t.seq_len, m.d_model, m.n_layers, m.n_heads)
    # nanoGPT's train.py: 6e-4 -> 6e-5 cosine, betas (0.9, 0.95), weight decay 0.1 on matrices, clip 1.0.
    nanogpt = t.model_copy(update={"lr": 6e-4, "min_lr": 6e-5, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95,
                                   "grad_clip": 1.0})  # fmt: skip
    recipes.append(Recipe("nanogpt", gpt2, make_optimizer(gpt2, nanogpt), nanogpt, tokens, tokenizer))

    torch.manual_seed(t.seed)
    llama = LlamaScorer(LlamaForCausalLM(hf_config(m)))
    plain = t.model_copy(update={"grad_clip": 0.0})
    recipes.append(Recipe("transformers", llama, torch.optim.AdamW(llama.parameters(), lr=t.lr), plain, tokens,
                          tokenizer))  # fmt: skip

    recipes.append(tisslm_recipe("default", load_params(project / "params.yaml"), project))
    return recipes


def ablation_recipes(project: Path, previous_data: Path | None) -> list[Recipe]:
    """The previous default, then one lever at a time set to params.yaml's value, then all of them.
    With `previous_data`, the previous default and each single lever train on that project's
    tokens, and the lever `data` is the previous default on this project's."""
    old_data = previous_data or project
    previous = load_params(project / "params.yaml", overrides(PREVIOUS))
    recipes = [tisslm_recipe("previous", previous, old_data)]
    for lever, keys in LEVERS.items():
        kept = {key: value for key, value in PREVIOUS.items() if key not in keys}
        recipes.append(tisslm_recipe(f"+{lever}", load_params(project / "params.yaml", overrides(kept)), old_data))
    if previous_data is not None:
        recipes.append(tisslm_recipe("+data", previous, project))
    recipes.append(tisslm_recipe("default", load_params(project / "params.yaml"), project))
    return recipes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--project", type=Path, default=Path("."), help="a project after `make run` (data/ and models/tokenizer)"
    )
    parser.add_argument("--minutes", type=float, default=3.0, help="training wall time per recipe")
    parser.add_argument("--slice-s", type=float, default=20.0, help="seconds per turn of the alternation")
    parser.add_argument("--ablation", action="store_true", help="one lever at a time instead of the four recipes")
    parser.add_argument("--previous-data", type=Path, help="a project whose tokens are the corpus before issue 16")
    parser.add_argument("--recipes", nargs="*", help="a subset, to screen (printed, not recorded)")
    parser.add_argument("--screen", nargs="*", default=[], metavar="NAME=OVERRIDES",
                        help='instead: params.yaml with each NAME\'s overrides, e.g. "small=model.d_model=128 '
                             'model.n_heads=4" (printed, not recorded)')  # fmt: skip
    args = parser.parse_args()

    params = load_params(args.project / "params.yaml")
    val_text = read_split(args.project / "data" / "clean", params.tokenize.val_fraction)["val"]
    if args.screen:
        screens = [spec.split("=", 1) for spec in args.screen]
        recipes = [tisslm_recipe(name, load_params(args.project / "params.yaml", values.split()), args.project)
                   for name, values in screens]  # fmt: skip
    else:
        recipes = ablation_recipes(args.project, args.previous_data) if args.ablation else four_recipes(args.project)
    if args.recipes:
        recipes = [r for r in recipes if r.name in args.recipes]
    budget = args.minutes * 60
    for recipe in recipes:
        recipe.model.train()
    while any(r.seconds < budget for r in recipes):
        for recipe in recipes:
            turn_end = min(budget, recipe.seconds + args.slice_s)
            while recipe.seconds < turn_end:
                started = time.perf_counter()
                recipe.train_step(recipe.seconds / budget)
                recipe.seconds += time.perf_counter() - started
        print(" | ".join(f"{r.name} {r.seconds:.0f}s/{r.step} steps" for r in recipes), flush=True)

    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "minutes_each": args.minutes,
        "previous": PREVIOUS,
        "default": {"model": params.model.model_dump(), "train": params.train.model_dump()},
        "recipes": {},
    }  # fmt: skip
    for recipe in recipes:
        recipe.model.eval()
        with torch.no_grad():
            scored = evaluate_texts(recipe.model, recipe.tokenizer, val_text, END_OF_TEXT, recipe.train.seq_len,
                                    params.evaluate.batch_size)  # fmt: skip
        report["recipes"][recipe.name] = {
            "val_bits_per_byte": scored["bits_per_byte"],
            "tokens_seen": recipe.tokens_seen,
            "steps": recipe.step,
            "parameters": sum(p.numel() for p in recipe.model.parameters()),
            "tokens_per_s": recipe.tokens_seen / recipe.seconds,
        }
        print(f"{recipe.name:24s} val bits/byte {scored['bits_per_byte']:.4f}  {recipe.tokens_seen:,} tokens  "
              f"{report['recipes'][recipe.name]['parameters']:,} params  "
              f"{report['recipes'][recipe.name]['tokens_per_s']:,.0f} tok/s", flush=True)  # fmt: skip
    scores = {name: r["val_bits_per_byte"] for name, r in report["recipes"].items()}
    if args.recipes or args.screen:  # a screen: printed, not the benchmark's record
        print(json.dumps(report, indent=2))
        return
    if args.ablation:
        report["gain_over_previous"] = {name: scores["previous"] / s - 1 for name, s in scores.items()}
        result = RESULTS.with_name("recipe_ablation.json")
    else:
        report["default_gain_over_nanogpt"] = scores["nanogpt"] / scores["default"] - 1
        report["default_is_best"] = scores["default"] == min(scores.values())
        result = RESULTS
    atomic_write_json(result, report)
    print(f"wrote {result}")


if __name__ == "__main__":
    main()

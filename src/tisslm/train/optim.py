"""The optimizers and the learning-rate schedule of training, chosen by params.yaml's `train`."""

from __future__ import annotations

import math

import torch

from tisslm.core.config import TrainParams
from tisslm.train.muon import Muon


def learning_rate(step: int, p: TrainParams) -> float:
    """Linear warmup to `lr`, then down to `min_lr` at max_steps: by a cosine, or (wsd) held at `lr`
    until the last `decay_fraction` of the steps and decayed linearly there. A stable phase keeps
    the rate high for longest, and the short decay at the end still anneals."""
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    if p.schedule == "wsd":
        decay_start = p.max_steps * (1 - p.decay_fraction)
        progress = max(0.0, step - decay_start) / max(1.0, p.max_steps - decay_start)
        return p.lr - (p.lr - p.min_lr) * min(1.0, progress)
    progress = (step - p.warmup_steps) / max(1, p.max_steps - p.warmup_steps)
    return p.min_lr + 0.5 * (p.lr - p.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the blocks' 2-D matrices, AdamW on embeddings, head and norms, as one optimizer, so
    that the loop, the schedule and the checkpoint see one state. Muon orthogonalises each matrix's
    momentum; its updates are scaled to AdamW's RMS (`match_rms_adamw`), so one `lr` serves both.
    Muon is `tisslm.train.muon.Muon`: torch's update, with the Newton-Schulz iterations batched
    over same-shape matrices on a GPU."""

    def __init__(self, model: torch.nn.Module, p: TrainParams):
        named = [(name, q) for name, q in model.named_parameters() if q.requires_grad]
        hidden = [q for name, q in named if q.dim() == 2 and name.startswith("layers.")]
        hidden_ids = {id(q) for q in hidden}
        rest = [q for _, q in named if id(q) not in hidden_ids]
        self.parts = [
            Muon(hidden, lr=p.lr, weight_decay=p.weight_decay, adjust_lr_fn="match_rms_adamw"),
            adamw(rest, p),
        ]
        super().__init__([{"params": []}], {})
        self.param_groups = [group for part in self.parts for group in part.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The parts' states as one optimizer's: parameter indices run on from one part to the next."""
        state, groups, offset = {}, [], 0
        for part in self.parts:
            part_state = part.state_dict()
            state.update({index + offset: values for index, values in part_state["state"].items()})
            groups += [
                {**group, "params": [i + offset for i in group["params"]]} for group in part_state["param_groups"]
            ]
            offset += sum(len(group["params"]) for group in part_state["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups, offset = list(state_dict["param_groups"]), 0
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{len(groups)} parameter groups saved, {len(self.param_groups)} expected")
        for part in self.parts:
            part_groups, groups = groups[: len(part.param_groups)], groups[len(part.param_groups) :]
            count = sum(len(group["params"]) for group in part_groups)
            part.load_state_dict({
                "state": {int(i) - offset: v for i, v in state_dict["state"].items() if offset <= int(i) < offset + count},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in part_groups],
            })  # fmt: skip
            offset += count
        self.param_groups = [group for part in self.parts for group in part.param_groups]  # loading made new dicts


def adamw(params: list[torch.nn.Parameter], p: TrainParams) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norms' gains are not pulled towards zero."""
    groups = [
        {"params": [q for q in params if q.dim() >= 2], "weight_decay": p.weight_decay},
        {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0},
    ]
    # CUDA: one fused kernel for all parameters. CPU: the plain per-parameter loop, which the
    # published CPU results were trained with (foreach rounds differently).
    implementation = {"fused": True} if params and params[0].is_cuda else {"foreach": False}
    return torch.optim.AdamW(groups, lr=p.lr, betas=(p.beta1, p.beta2), **implementation)


def make_optimizer(model: torch.nn.Module, p: TrainParams) -> torch.optim.Optimizer:
    """The optimizer `train.optimizer` names, over the model's trainable parameters."""
    if p.optimizer == "muon":
        return MuonAdamW(model, p)
    return adamw([q for q in model.parameters() if q.requires_grad], p)

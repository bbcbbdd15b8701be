"""Muon with its Newton-Schulz iterations batched over same-shape matrices.

`torch.optim.Muon` orthogonalises one matrix at a time: per matrix, 5 Newton-Schulz iterations of 3
matmuls each, plus the momentum and update ops, each a separate kernel. At GPT-2-small scale on a GPU
those kernels are small and the step is launch-bound (about 31% of training throughput). This Muon
stacks the momenta of the matrices that share (shape, dtype, device) into one (G, m, n) tensor and
runs each iteration as one batched matmul for the whole stack; the elementwise parts (momentum,
Nesterov, weight decay, update) are `torch._foreach_*` ops over all of a group's parameters.

The arithmetic is torch's: same ops in the same order, in bf16, on the same memory layouts (tall
matrices transposed as torch does). On CPU the Newton-Schulz matmuls stay per matrix (see
`orthogonalize`), and the result is bitwise identical to `torch.optim.Muon` (tests/test_muon.py
checks it); on an H200 the batched step gave torch's bits too, at GPT-2-small shapes. The constructor, `param_groups` keys and per-parameter state ("momentum_buffer") are torch's
too, so a checkpoint of either optimizer loads into the other.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor


class Muon(torch.optim.Optimizer):
    """`torch.optim.Muon`'s update, batched per (shape, dtype, device); same arguments and state."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr >= 0.0:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not momentum >= 0.0:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"Muon only supports 2D parameters whereas we found a parameter with size: {p.size()}"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)
        return loss

    def _step_group(self, group: dict, params: list[Tensor]) -> None:
        lr = group["lr"].item() if isinstance(group["lr"], Tensor) else group["lr"]
        momentum = group["momentum"]
        grads = [p.grad for p in params]
        for p, g in zip(params, grads, strict=True):
            if torch.is_complex(p):
                raise RuntimeError("Muon does not support complex parameters")
            if g.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
        bufs = [self.state[p]["momentum_buffer"] for p in params]

        torch._foreach_lerp_(bufs, grads, 1 - momentum)  # buf = momentum * buf + (1 - momentum) * grad
        updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
        decay = 1 - lr * group["weight_decay"]  # decoupled weight decay

        same_shape = defaultdict(list)  # (shape, dtype, device) -> indices into params
        for i, p in enumerate(params):
            same_shape[p.shape, p.dtype, p.device].append(i)
        for (shape, dtype, _), indices in same_shape.items():
            same = [params[i] for i in indices]
            if dtype in (torch.bfloat16, torch.float16):  # _foreach_mul_ rounds `decay` to bf16/fp16 first
                for p in same:
                    p.mul_(decay)
            else:
                torch._foreach_mul_(same, decay)
            stacked = torch.stack([updates[i] for i in indices]).bfloat16()  # (G, m, n)
            ortho = orthogonalize(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"])
            ortho = ortho.to(dtype, memory_format=torch.contiguous_format)  # (G, m, n)
            alpha = -adjust_lr(lr, group["adjust_lr_fn"], shape)
            torch._foreach_add_(same, list(ortho.unbind(0)), alpha=alpha)


def orthogonalize(
    x: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float, batched: bool | None = None
) -> Tensor:
    """Newton-Schulz iterations on each matrix of a (G, m, n) bf16 stack, as torch runs them on one.

    Batched matmuls over the stack on a GPU; matrix by matrix with torch's own 2-D ops on CPU (or as
    `batched` says). On CPU a stacked bf16 matmul need not give each matrix the bits it gets alone:
    ATen sends a small product to another kernel than a stack of them (oneDNN only above 16**3
    multiply-adds, batch counted), and oneDNN plans its blocking, so its order of summation, for the
    whole problem and thread count: with 16 threads the Gram matrix of a stacked 4096x768 or 768x2048
    pair came out different. Launches cost little on CPU, so there the loop gives torch's bits on
    any CPU. On an H200 (torch 2.11, cuBLAS) the stacked path gave torch's bits at GPT-2-small shapes,
    though not for a 6x10 matrix (7e-4 off after 5 steps)."""
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # (G, n, m): the short side first, as torch transposes
    if batched is None:
        batched = x.device.type != "cpu"
    if batched:
        out = newton_schulz(x, ns_coefficients, ns_steps, eps)
    else:
        out = torch.stack([newton_schulz(m, ns_coefficients, ns_steps, eps) for m in x.unbind(0)])
    return out.mT if tall else out  # (G, m, n)


def newton_schulz(x: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float) -> Tensor:
    """torch's `_zeropower_via_newtonschulz` on one wide (r, c) bf16 matrix, r <= c, or on a (G, r, c)
    stack of them with batched matmuls; the norms are taken matrix by matrix, as torch takes them."""
    a, b, c = ns_coefficients
    if x.dim() == 3:
        mm, addmm = torch.bmm, torch.baddbmm
        norms = torch.stack(torch._foreach_norm(list(x.unbind(0)))).view(-1, 1, 1)  # (G, 1, 1)
    else:
        mm, addmm = torch.mm, torch.addmm
        norms = x.norm()  # ()
    x = x / norms.clamp(min=eps)  # (G, r, c): spectral norm at most 1
    for _ in range(ns_steps):
        gram = mm(x, x.mT)  # (G, r, r)
        gram_update = addmm(gram, gram, gram, beta=b, alpha=c)  # (G, r, r)
        x = addmm(x, gram_update, x, beta=a)  # (G, r, c)
    return x


def adjust_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch's `_adjust_lr`: scales the update to a consistent RMS across rectangular matrices."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, rows / cols))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    else:
        ratio = 1.0
    return lr * ratio

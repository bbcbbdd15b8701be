"""The training loss: cross-entropy of the output head's logits, chunk by chunk, never materialised."""

from __future__ import annotations

import torch


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: int = 256,
) -> torch.Tensor:
    """Mean cross-entropy of `targets` (N,) under logits `hidden @ weight.T`, chunk by chunk.

    The (N, vocab) logits of a training batch are the largest tensor of a small LM's step and
    are read and written several times by a plain cross-entropy; here each chunk of rows gets
    its logits, loss and gradients while it is still in cache, and the full matrix never exists.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_rows)
    return _linear_cross_entropy_chunks(hidden, weight, targets, ignore_index, chunk_rows, with_grads=False)[0]


def _linear_cross_entropy_chunks(hidden, weight, targets, ignore_index, chunk_rows, with_grads):
    device_type = hidden.device.type
    # Under autocast the matmuls run in the autocast dtype, as nn.Linear's would; sums stay fp32.
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    acc_dtype = torch.promote_types(dtype, torch.float32)  # softmax and sums: at least fp32
    with torch.autocast(device_type, enabled=False):
        w = weight.to(dtype)
        valid = targets != ignore_index
        # Each row's share of the mean, folded into the narrow (rows, d_model) side of the matmuls.
        scale = (valid.to(acc_dtype) / valid.sum().clamp(min=1))[:, None]  # (N, 1)
        safe_targets = targets.masked_fill(~valid, 0)[:, None]  # (N, 1)
        loss = hidden.new_zeros((), dtype=acc_dtype)
        grad_hidden = torch.empty_like(hidden) if with_grads else None
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if with_grads else None
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, t, s = hidden[rows].to(dtype), safe_targets[rows], scale[rows]
            log_probs = torch.log_softmax((h @ w.T).to(acc_dtype), dim=-1)  # (rows, vocab)
            loss -= (log_probs.gather(1, t) * s).sum()
            if with_grads:
                grad_logits = log_probs.exp_().scatter_add_(1, t, torch.full_like(t, -1, dtype=acc_dtype))
                grad_logits = grad_logits.to(dtype)  # softmax - one_hot, unscaled: (rows, vocab)
                grad_hidden[rows] = (grad_logits @ w) * s
                grad_weight.add_(grad_logits.T @ (h * s.to(dtype)))
    return loss, grad_hidden, grad_weight


def loss_chunk_rows(device_type: str) -> int:
    """Rows per chunk of `linear_cross_entropy`. On a CPU, 256 rows keep a chunk's logits in cache.
    On a GPU the chunks only bound memory (8192 x a 32k vocabulary in fp32 is 1 GiB), and each
    one costs a dozen kernel launches: few large ones."""
    return 8192 if device_type == "cuda" else 256


class _LinearCrossEntropy(torch.autograd.Function):
    """Computes the gradients in the forward pass, chunk by chunk, and scales them in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_rows):
        loss, grad_hidden, grad_weight = _linear_cross_entropy_chunks(
            hidden, weight, targets, ignore_index, chunk_rows, with_grads=True
        )
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None

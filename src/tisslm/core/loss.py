"""The training loss: cross-entropy of the output head's logits, chunk by chunk, never materialised;
and distillation, the same pass also matching a teacher's next-token distributions (`train.teacher`)."""

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
        return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_rows, None)[0]
    return _linear_cross_entropy_chunks(hidden, weight, targets, ignore_index, chunk_rows, with_grads=False)[0]


def linear_distillation(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    share: float,
    temperature: float,
    ignore_index: int = -100,
    chunk_rows: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Knowledge distillation (Hinton et al. 2015) fused into the chunked cross-entropy.

    Returns (loss, parts): loss = (1 - share) * CE + share * T^2 * KL, where CE is that of
    `linear_cross_entropy` and KL is KL(teacher || student) of both distributions softened by
    temperature T, both means over the target tokens; the T^2 keeps the KL's gradients on the
    scale of the CE's whatever T. parts (2,) = (CE, KL), detached, for the logs. The teacher's
    logits `teacher_hidden @ teacher_weight.T` (N, vocab) are made chunk by chunk beside the
    student's, so neither model's full logit matrix ever exists; no gradient reaches the teacher.
    """
    teacher = (teacher_hidden.detach(), teacher_weight.detach(), share, temperature)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_rows, teacher)
    loss, parts, _, _ = _linear_cross_entropy_chunks(hidden, weight, targets, ignore_index, chunk_rows, False, teacher)
    return loss, parts


def _linear_cross_entropy_chunks(hidden, weight, targets, ignore_index, chunk_rows, with_grads, teacher=None):
    """(loss, parts, grad_hidden, grad_weight); `teacher` (hidden, weight, share, temperature) or
    None. Without one, parts is the CE and a zero KL, and loss is the CE alone."""
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
        kl = hidden.new_zeros((), dtype=acc_dtype)
        grad_hidden = torch.empty_like(hidden) if with_grads else None
        grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if with_grads else None
        if teacher is not None:
            teacher_hidden, teacher_weight, share, temperature = teacher
            teacher_w = teacher_weight.to(dtype)
        for start in range(0, hidden.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, t, s = hidden[rows].to(dtype), safe_targets[rows], scale[rows]
            logits = (h @ w.T).to(acc_dtype)  # (rows, vocab)
            log_probs = torch.log_softmax(logits, dim=-1)
            loss -= (log_probs.gather(1, t) * s).sum()
            if teacher is not None:
                teacher_logits = (teacher_hidden[rows].to(dtype) @ teacher_w.T).to(acc_dtype)  # (rows, vocab)
                log_q = torch.log_softmax(teacher_logits / temperature, dim=-1)  # the teacher, softened
                log_p = torch.log_softmax(logits / temperature, dim=-1)  # the student, softened
                q = log_q.exp()
                kl += ((q * (log_q - log_p)).sum(1, keepdim=True) * s).sum()
            if with_grads:
                grad_logits = log_probs.exp_().scatter_add_(1, t, torch.full_like(t, -1, dtype=acc_dtype))
                if teacher is not None:  # d(T^2 KL)/d logits = T * (softmax(logits / T) - q)
                    grad_logits = (1 - share) * grad_logits + (share * temperature) * (log_p.exp_() - q)
                grad_logits = grad_logits.to(dtype)  # the loss's gradient, unscaled by s: (rows, vocab)
                grad_hidden[rows] = (grad_logits @ w) * s
                grad_weight.add_(grad_logits.T @ (h * s.to(dtype)))
        parts = torch.stack([loss, kl])  # (CE, KL)
        if teacher is not None:
            loss = (1 - share) * loss + share * temperature**2 * kl
    return loss, parts, grad_hidden, grad_weight


def loss_chunk_rows(device_type: str) -> int:
    """Rows per chunk of `linear_cross_entropy`. On a CPU, 256 rows keep a chunk's logits in cache.
    On a GPU the chunks only bound memory (8192 x a 32k vocabulary in fp32 is 1 GiB), and each
    one costs a dozen kernel launches: few large ones."""
    return 8192 if device_type == "cuda" else 256


class _LinearCrossEntropy(torch.autograd.Function):
    """Computes the gradients in the forward pass, chunk by chunk, and scales them in backward.
    Returns (loss, parts); parts, for the logs, takes no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_rows, teacher):
        loss, parts, grad_hidden, grad_weight = _linear_cross_entropy_chunks(
            hidden, weight, targets, ignore_index, chunk_rows, True, teacher
        )
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(parts)
        return loss, parts

    @staticmethod
    def backward(ctx, grad_loss, grad_parts):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None

"""Held-out evaluation as lm-evaluation-harness defines it for perplexity tasks.

Each document is scored on its own by rolling windows (`loglikelihood_rolling`): the first
window is conditioned on <|endoftext|>, each later one on the token before it, and every token
of the document is predicted exactly once. Then, over all documents,

    bits_per_byte   = -sum(log-likelihood) / sum(UTF-8 bytes) / ln 2
    byte_perplexity = exp(-sum(log-likelihood) / sum(bytes))
    word_perplexity = exp(-sum(log-likelihood) / sum(words))

which, unlike token perplexity, compare across tokenizers and with general-purpose compressors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from tisslm.core.model import TissLM

IGNORE = -100


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows that together predict every token once, in order."""
    context = [prefix, *tokens]
    return [
        (context[start : start + max_len], list(tokens[start : start + max_len]))
        for start in range(0, len(tokens), max_len)
    ]


@torch.no_grad()
def document_loglikelihoods(
    model: TissLM,
    documents: Sequence[Sequence[int]],
    prefix: int,
    max_len: int,
    batch_size: int = 16,
    on_logits: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> list[float]:
    """Summed natural-log likelihood of each document's tokens under `model` (eval mode, fp32).

    `on_logits`, if given, sees each window's (tokens, vocab) fp32 logits and (tokens,) targets, so that
    other figures of the same predictions (calibration) need no second pass over the model.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    windows = [(doc, w) for doc, tokens in enumerate(documents) for w in rolling_windows(tokens, prefix, max_len)]
    totals = [0.0] * len(documents)
    for start in tqdm(range(0, len(windows), batch_size), desc="evaluate", unit=" batches"):
        batch = windows[start : start + batch_size]
        width = max(len(inputs) for _, (inputs, _) in batch)
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        for row, (_, (x, y)) in enumerate(batch):
            inputs[row, : len(x)] = torch.tensor(x)
            targets[row, : len(y)] = torch.tensor(y)
        hidden = model.hidden_states(inputs.to(device))  # (B, width, d_model); padding sits after, causality hides it
        for row, (doc, _) in enumerate(batch):
            valid = (targets[row] != IGNORE).to(device)
            # Through the head module, not its weight: it may be quantized.
            logits = model.lm_head(hidden[row][valid]).float()  # (valid tokens, vocab)
            target = targets[row].to(device)[valid]  # (valid tokens,)
            totals[doc] -= F.cross_entropy(logits, target, reduction="sum").item()
            if on_logits is not None:
                on_logits(logits, target)
    model.train(was_training)
    return totals


def perplexity_metrics(
    loglikelihoods: Sequence[float], n_tokens: int, n_bytes: int, n_words: int | None = None
) -> dict:
    """lm-evaluation-harness's bits_per_byte, byte and word perplexity, plus loss per token: the one
    place where a log-likelihood becomes bits per byte (the trainer's final figure comes from here too)."""
    nll = -sum(loglikelihoods)
    metrics = {
        "documents": len(loglikelihoods),
        "tokens": n_tokens,
        "bytes": n_bytes,
        "loss_per_token": nll / n_tokens,
        "token_perplexity": math.exp(nll / n_tokens),
        "bits_per_byte": nll / n_bytes / math.log(2),
        "byte_perplexity": math.exp(nll / n_bytes),
    }
    if n_words is not None:
        metrics |= {"words": n_words, "word_perplexity": math.exp(nll / n_words)}
    return metrics


def evaluate_texts(
    model: TissLM,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    prefix_token: str,
    window: int,
    batch_size: int = 16,
    on_logits: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> dict:
    """Tokenize `texts` and score them in windows of `window` tokens: the perplexity metrics of the set.

    `window` should be the context the model was trained at: positions beyond it were never seen.
    `on_logits` is `document_loglikelihoods`'s hook on the same predictions.
    """
    prefix = tokenizer.token_to_id(prefix_token)
    documents = [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    loglikelihoods = document_loglikelihoods(model, documents, prefix, window, batch_size, on_logits)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_words = sum(len(re.split(r"\s+", t.strip())) for t in texts if t.strip())
    return perplexity_metrics(loglikelihoods, sum(len(d) for d in documents), n_bytes, n_words)

"""Autoregressive generation over a batch of prompts of different lengths.

Prompts are left-padded to a common length so that every row's next token sits in the last
column; the model masks the pads and counts positions from each row's first real token, so a
batched row decodes exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from tisslm.config import GenerateParams
from tisslm.errors import TissLMError, parse
from tisslm.model import KVCache, TissLM


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the nucleus of mass top_p.

    The nucleus is the smallest set of most likely tokens whose probabilities sum to at least
    top_p (Holtzman et al., 2019); the most likely token is always kept.
    """
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V); temperature 0 means greedy.

    With top_k, the nucleus and the draw work on the k best logits only, not on all V with the
    rest at -inf: the same distribution, for a fraction of the sorting and random numbers when
    k is much smaller than V (the difference shows when a server samples many rows per step).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        best, ids = torch.topk(logits, top_k, dim=-1)  # (B, k) each, best first
        probs = filter_logits(best, top_p=top_p).softmax(dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1), an index into the k best
        return ids.gather(-1, choice).squeeze(-1)
    probs = filter_logits(logits, top_p=top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: TissLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    stop_tokens: Iterable[int] = (),
    vocab_limit: int | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids); return the new tokens of each, stop token excluded.

    `vocab_limit` keeps sampling below the tokenizer's vocabulary when the model's embedding
    has more rows than the tokenizer has tokens.
    """
    # The bounds live in one place, the schema of params.yaml's `generate` section.
    settings = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "max_new_tokens": max_new_tokens}
    parse(GenerateParams, settings, "generate")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise TissLMError("every prompt needs at least one token")
    config = model.config
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > config.max_seq_len:
        raise TissLMError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds max_seq_len={config.max_seq_len}"
        )
    device = next(model.parameters()).device
    batch = len(prompts)
    pads = [longest - len(p) for p in prompts]
    idx = torch.tensor(
        [[0] * pad + list(p) for pad, p in zip(pads, prompts, strict=True)], dtype=torch.long, device=device
    )
    left_pad = torch.tensor(pads, device=device) if any(pads) else None
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)

    was_training = model.training
    model.eval()
    try:
        cache = None
        if use_cache:
            dtype = next(model.parameters()).dtype
            cache = KVCache(config, batch, longest + max_new_tokens, dtype, device, left_pad)
        logits = model(idx, cache=cache, left_pad=None if use_cache else left_pad)[:, -1]  # (B, V)
        new_tokens = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        lengths = torch.full((batch,), max_new_tokens, device=device)
        for step in range(max_new_tokens):
            if vocab_limit is not None:
                logits[:, vocab_limit:] = float("-inf")
            next_token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            new_tokens[:, step] = next_token
            if stop.numel():
                just_stopped = torch.isin(next_token, stop) & ~finished
                lengths[just_stopped] = step
                finished |= just_stopped
                if finished.all():
                    break
            if step == max_new_tokens - 1:
                break
            if use_cache:
                logits = model(next_token[:, None], cache=cache)[:, -1]
            else:
                logits = model(torch.cat((idx, new_tokens[:, : step + 1]), dim=1), left_pad=left_pad)[:, -1]
    finally:
        model.train(was_training)
    return [row[:n].tolist() for row, n in zip(new_tokens, lengths.tolist(), strict=True)]

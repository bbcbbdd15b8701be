"""Autoregressive generation over a batch of prompts of different lengths.

Prompts are left-padded to a common length so that every row's next token sits in the last
column; the model masks the pads and counts positions from each row's first real token, so a
batched row decodes exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tokenizers import Tokenizer

from tisslm.core.errors import TissLMError, parse
from tisslm.core.model import KVCache, TissLM
from tisslm.core.sampling import LogitsProcessor, SamplingParams, sample_next
from tisslm.core.tokenizer import END_OF_TEXT


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
    logits_processor: LogitsProcessor | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids); return the new tokens of each, stop token excluded.

    `vocab_limit` keeps sampling below the tokenizer's vocabulary when the model's embedding
    has more rows than the tokenizer has tokens. `logits_processor` (a watermark, say) changes
    each step's logits after the vocab limit and before sampling, greedy included; it is given
    each row's previous token, the prompt's last at the first step.
    """
    # The bounds live in one place, the schema of params.yaml's `generate` section.
    settings = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "max_new_tokens": max_new_tokens}
    parse(SamplingParams, settings, "generate")
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
        previous = idx[:, -1]  # (B,): left padding puts every prompt's last token in the last column
        for step in range(max_new_tokens):
            if vocab_limit is not None:
                logits[:, vocab_limit:] = float("-inf")
            if logits_processor is not None:
                logits = logits_processor(logits, previous)
            next_token = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            previous = next_token
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


def complete(
    model: TissLM,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    settings: SamplingParams,
    logits_processor: LogitsProcessor | None = None,
    **options,
) -> list[str]:
    """Continue each text: encode, generate until <|endoftext|> or the token budget, decode the new
    tokens. The one text-in, text-out path the CLI, the stages and the MLflow pyfunc share;
    `logits_processor` and `options` (use_cache) go to generate()."""
    prompts = [tokenizer.encode(text).ids for text in texts]
    stop = tokenizer.token_to_id(END_OF_TEXT)
    outputs = generate(
        model,
        prompts,
        settings.max_new_tokens,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        seed=settings.seed,
        stop_tokens=() if stop is None else (stop,),
        vocab_limit=tokenizer.get_vocab_size(),
        logits_processor=logits_processor,
        **options,
    )
    return [tokenizer.decode(ids) for ids in outputs]

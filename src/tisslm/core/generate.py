"""Autoregressive generation over a batch of prompts of different lengths.

Each prompt decodes in a slot of its own (`tisslm.core.decode.Decoder`): prompts are read one by
one, then one step advances every row, each at its own position, so a batched row decodes
exactly as it would alone. `use_cache=False` recomputes every position at every step instead,
the slow reference the cached paths are tested against.

Speculative decoding (`lookahead`) drafts tokens by prompt lookup (`draft_by_lookup`) and checks
them all in one forward; the longest prefix greedy decoding would have produced is kept, plus the
model's own next token, so the output is plain greedy's, in fewer forwards when the guesses hit.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence

import torch
from tokenizers import Tokenizer

from tisslm.core.decode import DecodeEngine, Decoder, draft_by_lookup
from tisslm.core.errors import TissLMError, parse
from tisslm.core.model import TissLM
from tisslm.core.sampling import LogitsProcessor, SamplingParams, sample_next
from tisslm.core.tokenizer import END_OF_TEXT

# Compiled decoders by model and batch size: compiling costs seconds, so later calls reuse them.
_compiled: weakref.WeakKeyDictionary[TissLM, dict[int, Decoder]] = weakref.WeakKeyDictionary()


def decoder_for(model: TissLM, slots: int, compile: bool) -> Decoder:
    """A decoder of `slots` rows; compiled ones are kept per model and reused."""
    if not compile:
        return Decoder(model, slots)
    per_model = _compiled.setdefault(model, {})
    if slots not in per_model:
        per_model[slots] = Decoder(model, slots, compile=True)
    return per_model[slots]


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
    compile: bool = False,
    lookahead: int = 0,
    decoder: DecodeEngine | None = None,
    on_tokens: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids); return the new tokens of each, stop token excluded.

    `vocab_limit` keeps sampling below the tokenizer's vocabulary when the model's embedding
    has more rows than the tokenizer has tokens. `logits_processor` (a watermark, say) changes
    each step's logits after the vocab limit and before sampling, greedy included; it is given
    each row's previous token, the prompt's last at the first step. `compile` decodes through the
    compiled step (see `tisslm.core.decode`); `lookahead` > 0 drafts that many tokens per step by
    prompt lookup (greedy only; see the module's docstring). `decoder` decodes with another engine
    (llama.cpp's, say) of at least as many slots as there are prompts. `on_tokens(n)` is told each
    time n more tokens (summed over the rows) have been generated: a progress bar's hook.
    """
    # The bounds live in one place, the schema of params.yaml's `generate` section.
    settings = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "max_new_tokens": max_new_tokens}
    parse(SamplingParams, settings, "generate")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise TissLMError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.config.max_seq_len:
        raise TissLMError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds max_seq_len={model.config.max_seq_len}"
        )
    if lookahead < 0:
        raise TissLMError(f"lookahead={lookahead} must be 0 (off) or more")
    if lookahead and (temperature != 0 or logits_processor is not None or not use_cache):
        raise TissLMError("speculative decoding (lookahead) needs greedy decoding (temperature 0), no logits "
                          "processor and the cache")  # fmt: skip
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop = set(stop_tokens)

    def pick(logits: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Next tokens (B,) from logits (B, V) and each row's previous token (B,)."""
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        if logits_processor is not None:
            logits = logits_processor(logits, previous)
        tokens = sample_next(logits, temperature, top_k, top_p, generator)
        if on_tokens is not None:
            on_tokens(len(tokens))
        return tokens

    was_training = model.training
    model.eval()
    try:
        if not use_cache:
            outputs = _recompute(model, prompts, max_new_tokens, pick, stop)
        else:
            rows = 1 if lookahead else len(prompts)  # speculation decodes one prompt at a time
            if decoder is None:
                decoder = decoder_for(model, rows, compile)
            elif decoder.slots < rows:
                raise TissLMError(f"the decoder has {decoder.slots} slots for {rows} rows")
            if lookahead:
                outputs = [
                    _speculate(decoder, list(p), max_new_tokens, lookahead, pick, stop, vocab_limit, on_tokens)
                    for p in prompts
                ]
            else:
                outputs = _decode(decoder, prompts, max_new_tokens, pick, stop)
    finally:
        model.train(was_training)
    return [_until_stop(row, stop) for row in outputs]


def _until_stop(tokens: list[int], stop: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop:
            return tokens[:i]
    return tokens


def _decode(
    decoder: DecodeEngine, prompts: Sequence[Sequence[int]], max_new_tokens: int, pick, stop: set[int]
) -> list[list[int]]:
    """Each prompt into its own slot, then one step for all rows until every row has its tokens or
    has stopped. Rows that stopped keep stepping with the others (their tokens are cut off afterwards)."""
    logits = torch.cat([decoder.prefill(row, list(p)) for row, p in enumerate(prompts)])  # (B, V)
    previous = torch.tensor([p[-1] for p in prompts], dtype=torch.long, device=decoder.device)  # (B,)
    rows = list(range(len(prompts)))
    outputs: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    for step in range(max_new_tokens):
        previous = pick(logits, previous)  # (B,)
        tokens = previous.tolist()
        for row, token in enumerate(tokens):
            outputs[row].append(token)
            stopped[row] = stopped[row] or token in stop
        if all(stopped) or step == max_new_tokens - 1:
            break
        logits = decoder.step(rows, tokens)
    return outputs


def _recompute(
    model: TissLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, pick, stop: set[int]
) -> list[list[int]]:
    """The reference without a cache: every step runs the whole sequences again. Rows are padded
    on the right, where the causal mask keeps the pads out of every real position's view."""
    device = next(model.parameters()).device
    sequences = [list(p) for p in prompts]
    rows = torch.arange(len(prompts), device=device)
    previous = torch.tensor([p[-1] for p in prompts], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        longest = max(len(s) for s in sequences)
        idx = torch.tensor([s + [0] * (longest - len(s)) for s in sequences], dtype=torch.long, device=device)
        last = torch.tensor([len(s) - 1 for s in sequences], device=device)  # (B,)
        logits = model(idx)[rows, last]  # (B, V)
        previous = pick(logits, previous)
        for sequence, token in zip(sequences, previous.tolist(), strict=True):
            sequence.append(token)
        if all(stop.intersection(s[len(p) :]) for s, p in zip(sequences, prompts, strict=True)):
            break
    return [s[len(p) :] for s, p in zip(sequences, prompts, strict=True)]


def _speculate(
    decoder: DecodeEngine, prompt: list[int], max_new_tokens: int, lookahead: int, pick, stop, vocab_limit, on_tokens
) -> list[int]:
    """Greedy decoding of one prompt in slot 0, up to `lookahead` drafted tokens checked per forward."""
    logits = decoder.prefill(0, prompt)  # (1, V)
    previous = torch.tensor(prompt[-1:], device=decoder.device)
    generated: list[int] = []
    while len(generated) < max_new_tokens:
        token = int(pick(logits, previous)[0])
        generated.append(token)
        if token in stop or len(generated) == max_new_tokens:
            break
        draft = draft_by_lookup(prompt + generated, min(lookahead, max_new_tokens - len(generated) - 1))
        if not draft:
            previous = torch.tensor([token], device=decoder.device)
            logits = decoder.step([0], [token])
            continue
        accepted, logits = decoder.verify_draft(0, token, draft, vocab_limit)
        generated.extend(accepted)
        if on_tokens is not None and accepted:
            on_tokens(len(accepted))
        if stop.intersection(accepted):
            break
        previous = torch.tensor([generated[-1]], device=decoder.device)
    return generated[:max_new_tokens]


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
    `logits_processor` and `options` (use_cache, compile, lookahead) go to generate()."""
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

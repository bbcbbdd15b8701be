"""Continuous batching: concurrent requests share every decode step of one model.

One thread owns the model's decode engine (`tisslm.core.decode`: TissLM's own, or llama.cpp's),
whose `max_batch` slots are the server's. Between two steps it drops cancelled and expired requests (their slots
free at once), admits waiting requests into free slots (one prefill forward each, which also
samples their first token), then advances the active slots with one decode step and samples each
row's next token. A request joins as
soon as a slot is free and leaves the step it finishes, without waiting for the rest of a batch:
the scheme of Orca (Yu et al., OSDI 2022) and vLLM, here with a contiguous cache per slot.

Speculative decoding (`lookahead`): while a single greedy request is active, a step drafts up to
`lookahead` tokens by prompt lookup and checks them in one forward (`Decoder.verify_draft`); the
tokens are those plain greedy decoding gives. With more requests active, the static step serves
them all, which speculation would only slow down.

Sampling is `tisslm.core.generate.sample_next`, and a seeded request owns a generator seeded as
`generate` seeds its own; the slot cache computes what the plain cache does, so a seeded
request yields the tokens `generate` gives for its prompt alone, whatever shares its steps.

Each request reports through its `on_event` callback, called on the engine thread: a `Token` per
generated token, then one `Finished`. The stop token ends a request and is not reported.

Scores. A request that asks (`logprobs`) gets each token's `Logprob` with its `Token`, and with
`prompt_logprobs` the prompt's tokens scored in one `PromptLogprobs` before them (with
max_new_tokens 0, all it gets: the way a client scores a text). The distribution is the model's
own, as vLLM reports it by default: log_softmax of the logits after the vocab limit, before
temperature, top-k, top-p and any logits processor, so that a score does not depend on how the
token was drawn. Only the rows that ask pay for it, and only a prefill that scores the prompt
computes the logits of every prompt position (the others need the last one's).

A request's `logits_processor` (a watermark, say) changes its own row of the logits before
sampling, seeing the row's previous token: the prompt's last at prefill, then the last sampled.

Penalties. A request whose params are `PenalizedSampling` with a frequency or presence penalty
keeps a count of each token it generated (a (V,) tensor on the model's device) and has its row
lowered by `apply_penalties` before its logits processor and sampling (after its scores, which
stay the model's own); such a request is not speculated on.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from tisslm.core.decode import DecodeEngine, Decoder, draft_by_lookup
from tisslm.core.errors import TissLMError
from tisslm.core.model import TissLM
from tisslm.core.sampling import LogitsProcessor, PenalizedSampling, SamplingParams, apply_penalties, sample_next
from tisslm.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "timeout", "error"]


@dataclass(frozen=True)
class Logprob:
    """How likely the model found a token: its log-probability, the entropy (nats) of the distribution
    it was drawn from, and that distribution's most likely tokens (see the module's "Scores")."""

    logprob: float
    entropy: float
    top: tuple[tuple[int, float], ...]  # (token, logprob), most likely first, as many as the request asked


@dataclass(frozen=True)
class Token:
    id: int
    logprob: Logprob | None = None  # for a request that asked for logprobs


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's tokens scored, from the second on (nothing predicts the first): reported before any Token."""

    logprobs: tuple[Logprob, ...]


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int  # tokens sampled, a final stop token included
    error: str | None = None


Event = Token | PromptLogprobs | Finished


class QueueFull(Exception):
    """Every slot is busy and `max_queue` requests already wait: the caller should retry later."""


class BatcherStopped(Exception):
    """The engine is shutting down and takes no more requests."""


@dataclass(eq=False)
class Request:
    """One generation, from `submit` to its `Finished`; what follows `submitted_at` is the engine's state."""

    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    stop_tokens: frozenset[int]
    deadline: float  # time.monotonic() after which the request is abandoned
    submitted_at: float = field(default_factory=time.monotonic)
    logprobs: int | None = None  # score each token with this many top alternatives (None: no scores)
    prompt_logprobs: bool = False  # score the prompt's tokens too
    logits_processor: LogitsProcessor | None = None  # changes this request's logits before sampling
    generator: torch.Generator | None = None  # None: the global RNG (unseeded requests sample together)
    counts: torch.Tensor | None = None  # (V,) times each token was generated, for a penalized request
    slot: int | None = None
    last_token: int = -1  # the latest token: the prompt's last until one is sampled, then the one decode feeds
    generated: int = 0
    tokens: list[int] = field(default_factory=list)  # reported so far: where speculative decoding drafts from
    cancelled: bool = False  # set from any thread; the engine acts on it before its next step
    done: bool = False


class Batcher:
    """Runs generation requests for one model on a thread of its own, batching them step by step."""

    def __init__(
        self,
        model: TissLM,
        max_batch: int = 8,
        max_queue: int = 64,
        vocab_limit: int | None = None,
        metrics: ServeMetrics | None = None,
        compile: bool = False,
        lookahead: int = 0,
        decoder: DecodeEngine | None = None,
    ):
        """`decoder`: the engine to decode with (llama.cpp's, say); by default TissLM's own over
        `max_batch` slots, its step compiled with `compile`."""
        self.model = model.eval()
        self.max_batch, self.max_queue = max_batch, max_queue
        self.vocab_limit = vocab_limit  # sampling stays below the tokenizer's vocabulary, as in `generate`
        self.lookahead = lookahead  # tokens drafted per step for a lone greedy request (0: off)
        self.metrics = metrics or ServeMetrics()
        self.decoder = decoder or Decoder(model, max_batch, compile=compile)
        if self.decoder.slots != max_batch:
            raise ValueError(f"the decoder has {self.decoder.slots} slots, the batcher {max_batch}")
        self._device = next(model.parameters()).device
        self._waiting: deque[Request] = deque()
        self._active: dict[int, Request] = {}  # slot -> request; touched by the engine thread only
        self._wakeup = threading.Condition()  # guards _waiting and _stopping
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tisslm-engine", daemon=True)
        self.metrics.queue_depth.set_function(lambda: len(self._waiting))
        self.metrics.active.set_function(lambda: len(self._active))

    # ---- the caller's side (any thread) ----

    def start(self) -> Batcher:
        with torch.inference_mode():
            self.decoder.warm_up()  # compile now, not on the first request
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish the current step, end every request as cancelled, and stop the thread."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        on_event: Callable[[Event], None],
        stop_tokens: Iterable[int] = (),
        timeout_s: float | None = None,
        *,
        logprobs: int | None = None,
        prompt_logprobs: bool = False,
        logits_processor: LogitsProcessor | None = None,
    ) -> Request:
        """Queue a generation; raises TissLMError for a prompt that cannot be run, QueueFull, BatcherStopped.

        `logprobs` scores each generated token with that many top alternatives, `prompt_logprobs`
        the prompt's tokens too (with as many, or none); `logits_processor` changes this request's
        logits before each sampling.
        """
        if not prompt:
            raise TissLMError("every prompt needs at least one token")
        max_seq_len = self.model.config.max_seq_len
        if len(prompt) + params.max_new_tokens > max_seq_len:
            raise TissLMError(
                f"prompt of {len(prompt)} tokens + max_new_tokens={params.max_new_tokens} exceeds max_seq_len={max_seq_len}"
            )
        request = Request(
            prompt=list(prompt),
            params=params,
            on_event=on_event,
            stop_tokens=frozenset(stop_tokens),
            deadline=math.inf if timeout_s is None else time.monotonic() + timeout_s,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logits_processor=logits_processor,
        )
        if params.seed is not None:
            request.generator = torch.Generator(device=self._device).manual_seed(params.seed)
        with self._wakeup:
            if self._stopping:
                raise BatcherStopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                self.metrics.rejected.inc()
                raise QueueFull(f"{len(self._waiting)} requests already wait for one of {self.max_batch} slots")
            self._waiting.append(request)
            self._wakeup.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (a client went away, or its text hit a stop string); its slot frees before the next step."""
        request.cancelled = True
        with self._wakeup:
            self._wakeup.notify()

    # ---- the engine thread ----

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not (self._stopping or self._waiting or self._active):
                        self._wakeup.wait()
                    if self._stopping:
                        break
                try:
                    self._step()
                except Exception as err:  # a bug: fail the requests in flight, keep serving the next ones
                    log.exception("engine step failed")
                    for request in [*self._active.values(), *self._drain_waiting()]:
                        self._finish(request, "error", error=f"{type(err).__name__}: {err}")
        for request in [*self._active.values(), *self._drain_waiting()]:
            self._finish(request, "cancelled")

    def _drain_waiting(self) -> list[Request]:
        with self._wakeup:
            drained = list(self._waiting)
            self._waiting.clear()
        return drained

    def _step(self) -> None:
        self._drop_abandoned()
        free = sorted(set(range(self.max_batch)) - set(self._active))
        while free:
            with self._wakeup:
                if not self._waiting:
                    break
                request = self._waiting.popleft()
            self._prefill(request, free.pop(0))
        if self._active:
            self._decode()

    def _drop_abandoned(self) -> None:
        now = time.monotonic()
        with self._wakeup:
            abandoned = [r for r in self._waiting if r.cancelled or now > r.deadline]
            for request in abandoned:
                self._waiting.remove(request)
        for request in [*abandoned, *(r for r in self._active.values() if r.cancelled or now > r.deadline)]:
            self._finish(request, "cancelled" if request.cancelled else "timeout")

    def _prefill(self, request: Request, slot: int) -> None:
        """Run the prompt into `slot` and sample the first token; the request then decodes with the rest.

        A request that scores its prompt gets the logits of every position, and its PromptLogprobs
        first; with max_new_tokens 0 that is all it gets, and it needs no slot.
        """
        generates = request.params.max_new_tokens > 0
        if not (generates or request.prompt_logprobs):
            self._finish(request, "length")
            return
        if generates:
            request.slot = slot
            self._active[slot] = request
            logits = self.decoder.prefill(slot, request.prompt, all_logits=request.prompt_logprobs)  # (T or 1, V)
        else:
            logits = self.model(torch.tensor([request.prompt], dtype=torch.long, device=self._device))[0]  # (T, V)
        self.metrics.prompt_tokens.inc(len(request.prompt))
        if request.prompt_logprobs:
            self._limit_vocab(logits)
            targets = torch.tensor(request.prompt[1:], dtype=torch.long, device=self._device)  # (T - 1,)
            top = [request.logprobs or 0] * len(targets)
            scores = score(logits[:-1].float().log_softmax(dim=-1), targets, top)
            self._report(request, PromptLogprobs(tuple(scores)))
            logits = logits[-1:]  # (1, V)
        if not generates:
            self._finish(request, "length")
            return
        request.last_token = request.prompt[-1]
        self._sample_and_report([request], logits)

    def _decode(self) -> None:
        started = time.perf_counter()
        slots = sorted(self._active)
        batch = [self._active[slot] for slot in slots]
        if not (len(batch) == 1 and self._speculate(batch[0])):
            logits = self.decoder.step(slots, [r.last_token for r in batch])  # (B, V)
            self._sample_and_report(batch, logits)
        self.metrics.step_latency.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(batch))

    def _speculate(self, request: Request) -> bool:
        """One speculative step for a lone greedy request; False when it cannot or found nothing to draft."""
        plain = request.params.temperature != 0 or request.logits_processor or request.logprobs is not None
        plain = plain or penalties(request.params) is not None
        if not self.lookahead or plain:
            return False
        remaining = request.params.max_new_tokens - request.generated
        draft = draft_by_lookup(request.prompt + request.tokens, min(self.lookahead, remaining - 1))
        if not draft:
            return False
        accepted, logits = self.decoder.verify_draft(request.slot, request.last_token, draft, self.vocab_limit)
        for token in accepted:
            self._accept(request, token, None)
            if request.done:
                return True
        self._sample_and_report([request], logits)
        return True

    def _sample_and_report(self, batch: list[Request], logits: torch.Tensor) -> None:
        """Sample each row's next token (B,) from logits (B, V), report it, and finish rows that are done.

        The rows that ask for logprobs are scored before any logits processor changes its own row.
        Rows that share settings and draw from the global RNG are sampled together, as are all
        greedy rows; a seeded row draws alone from its own generator, exactly as `generate` would.
        """
        self._limit_vocab(logits)
        scored = [row for row, request in enumerate(batch) if request.logprobs is not None]
        logprobs = logits[scored].float().log_softmax(dim=-1) if scored else None  # (S, V)
        for row, request in enumerate(batch):
            if (penalty := penalties(request.params)) is not None:
                if request.counts is None:
                    request.counts = torch.zeros(logits.size(-1), dtype=torch.int32, device=logits.device)
                logits[row] = apply_penalties(logits[row], request.counts, *penalty)
            if request.logits_processor is not None:
                previous = torch.tensor([request.last_token], dtype=torch.long, device=logits.device)  # (1,)
                logits[row : row + 1] = request.logits_processor(logits[row : row + 1], previous)
        next_tokens = torch.empty(len(batch), dtype=torch.long, device=logits.device)  # (B,)
        groups: dict[tuple, list[int]] = {}
        for row, request in enumerate(batch):
            p = request.params
            if p.temperature == 0:
                groups.setdefault(("greedy",), []).append(row)
            elif request.generator is None:
                groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(row)
            else:
                next_tokens[row] = sample_next(
                    logits[row : row + 1], p.temperature, p.top_k, p.top_p, request.generator
                )
        for rows in groups.values():
            p = batch[rows[0]].params
            next_tokens[rows] = sample_next(logits[rows], p.temperature, p.top_k, p.top_p)
        scores: dict[int, Logprob] = {}
        if logprobs is not None:
            top = [batch[row].logprobs for row in scored]
            scores = dict(zip(scored, score(logprobs, next_tokens[scored], top), strict=True))
        for row, (request, token) in enumerate(zip(batch, next_tokens.tolist(), strict=True)):
            self._accept(request, token, scores.get(row))

    def _accept(self, request: Request, token: int, logprob: Logprob | None) -> None:
        """`token` is the request's next: report it, or finish the request on a stop token or its budget."""
        request.generated += 1
        self.metrics.generation_tokens.inc()
        if request.generated == 1:
            self.metrics.time_to_first_token.observe(time.monotonic() - request.submitted_at)
        if token in request.stop_tokens:
            self._finish(request, "stop")
            return
        request.last_token = token
        request.tokens.append(token)
        if request.counts is not None:
            request.counts[token] += 1
        self._report(request, Token(token, logprob))
        if request.generated == request.params.max_new_tokens:
            self._finish(request, "length")

    def _limit_vocab(self, logits: torch.Tensor) -> None:
        """Keep sampling and scores below the tokenizer's vocabulary, in place on logits (..., V)."""
        if self.vocab_limit is not None:
            logits[..., self.vocab_limit :] = float("-inf")

    def _finish(self, request: Request, reason: FinishReason, error: str | None = None) -> None:
        if request.done:
            return
        request.done = True
        if request.slot is not None:
            del self._active[request.slot]
        self.metrics.finished.labels(reason).inc()
        self._report(request, Finished(reason, len(request.prompt), request.generated, error))

    def _report(self, request: Request, event: Event) -> None:
        try:
            request.on_event(event)
        except Exception:  # a listener's bug must not stop the others' generations
            log.exception("on_event failed; cancelling the request")
            request.cancelled = True


def penalties(params: SamplingParams) -> tuple[float, float] | None:
    """(frequency_penalty, presence_penalty) of params that ask for them; None for the others."""
    if isinstance(params, PenalizedSampling) and params.penalized:
        return params.frequency_penalty, params.presence_penalty
    return None


def score(logprobs: torch.Tensor, tokens: torch.Tensor, top: Sequence[int]) -> list[Logprob]:
    """Each token of tokens (N,) scored under its row of log-probabilities (N, V): its logprob, the
    row's entropy and the row's top[i] most likely tokens."""
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)  # (N,)
    entropy = torch.special.entr(logprobs.exp()).sum(dim=-1)  # (N,) -sum p log p, with 0 log 0 = 0
    best, ids = logprobs.topk(max(top, default=0), dim=-1)  # (N, k) each, most likely first
    rows = zip(chosen.tolist(), entropy.tolist(), ids.tolist(), best.tolist(), top, strict=True)
    return [Logprob(lp, h, tuple(zip(i[:k], b[:k], strict=True))) for lp, h, i, b, k in rows]

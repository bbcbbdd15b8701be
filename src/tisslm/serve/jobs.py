"""The generations of one HTTP request, from the engine's thread to the client: one body, or an SSE stream.

Batcher callbacks run on the batcher thread and only hand events over to the event loop; the text
is decoded and checked for stop strings here, on the loop. A client that goes away cancels its
generations, and their slots free before the next decode step.

A job that asks for logprobs hands each token's score out with the update that carries the
token's text (`Scored`), so that a stream's chunks and a whole body hold the same scores; with
`echo`, each choice's text begins with its prompt, scored too when logprobs are asked.

With a content filter, each choice's generated text goes through an `OutputGuard`: it leaves a
line at a time, once the filter has seen it, and a choice the filter blocks ends there with
finish_reason `content_filter` (its generation cancelled). Its scored tokens are then handed out
with its last update, less those that fall in a span the filter redacted or blocked: a token's
text must not bring back what the filter took out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from tisslm.core.errors import TissLMError
from tisslm.core.sampling import LogitsProcessor, SamplingParams
from tisslm.safety.filters import ContentFilter, OutputGuard
from tisslm.serve.auditing import note
from tisslm.serve.batching import Batcher, BatcherStopped, Event, Finished, Logprob, PromptLogprobs, QueueFull, Token
from tisslm.serve.batching import Request as EngineRequest
from tisslm.serve.schemas import APIError, ChatRequest, CompletionRequest, Usage
from tisslm.serve.text import TextOffsets, TextStream, Vocabulary

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel) -> str:
    # ASCII only: a raw U+2028 or U+0085 in the text would end the line for clients that split on them.
    return f"data: {json.dumps(payload.model_dump(mode='json'), separators=(',', ':'))}\n\n"


@dataclass(frozen=True)
class Scored:
    """A token of a choice's text, where its text begins there, and its score."""

    token: int
    offset: int  # in characters, from the start of the choice's text (its echoed prompt included)
    logprob: Logprob | None  # None for the prompt's first token, which nothing predicts


@dataclass
class Update:
    """A step of one choice: new text, the tokens it came from when logprobs are asked, and the
    finish reason once it ends."""

    index: int
    text: str
    finish_reason: str | None
    tokens: list[Scored] | None = None  # None: logprobs not asked
    filter_results: list[dict] | None = None  # the output filter's decisions, with the choice's last update

    def extend(self, later: Update) -> None:
        """Take in the next update of the same choice (an answer not streamed is all of them)."""
        self.text += later.text
        self.finish_reason = later.finish_reason
        if self.tokens is not None and later.tokens is not None:
            self.tokens += later.tokens
        if later.filter_results is not None:
            self.filter_results = later.filter_results


class Shape(Protocol):
    """How an endpoint shapes its answers: streamed chunks, or one body at the end."""

    def opening(self, choices: int) -> list[BaseModel]:
        """The chunks a stream starts with, before any text."""

    def chunk(self, update: Update) -> BaseModel:
        """The chunk of one update."""

    def usage_chunk(self, usage: Usage) -> BaseModel:
        """The last chunk of a stream whose client asked for the usage."""

    def whole(self, choices: list[Update], usage: Usage) -> BaseModel:
        """The body of an answer that is not streamed: each choice's updates taken together."""


class Job:
    """The generations of one HTTP request, one per choice (a prompt, and its sampling settings),
    their engine events merged into one queue.

    `logprobs` asks the engine to score each token with that many top alternatives; `echo`, the
    prompts' texts, begins each choice's text with its prompt (scored too, with `logprobs`).
    """

    def __init__(
        self,
        engine: Batcher,
        vocabulary: Vocabulary,
        prompts: list[list[int]],
        params: Sequence[SamplingParams],
        stop_tokens: list[int],
        stop_strings: list[str],
        timeout_s: float,
        logprobs: int | None = None,
        echo: Sequence[str] | None = None,
        content_filter: ContentFilter | None = None,
        logits_processor: LogitsProcessor | None = None,
        prompt_tokens: int | None = None,
    ):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.texts = [TextStream(vocabulary.tokenizer, stop_strings) for _ in prompts]
        self.prompts = prompts
        self.prompt_tokens = sum(len(p) for p in prompts) if prompt_tokens is None else prompt_tokens
        self.completion_tokens = [0] * len(prompts)
        self.outputs = [""] * len(prompts)  # each choice's generated text so far (never its echo), for the audit log
        self.scoring = logprobs is not None
        self.echo = echo
        self.vocabulary = vocabulary
        self.scored: list[list[Scored]] = [[] for _ in prompts]  # each choice's tokens so far, when scoring
        self.offsets = [TextOffsets(vocabulary, len(echo[i]) if echo is not None else 0) for i in range(len(prompts))]
        self.sent_tokens = [0] * len(prompts)  # of each choice's tokens, those handed out in updates
        active = content_filter is not None and content_filter.active
        self.guards = [OutputGuard(content_filter) for _ in prompts] if active else None
        self.held: list[list[Scored]] = [[] for _ in prompts]  # scored tokens a guard has not cleared yet
        self.requests: list[EngineRequest] = []
        try:
            for index, (prompt, settings) in enumerate(zip(prompts, params, strict=True)):
                on_event = partial(self._deliver, index)
                scores = {"logprobs": logprobs, "prompt_logprobs": self.scoring and echo is not None}
                self.requests.append(
                    engine.submit(
                        prompt, settings, on_event, stop_tokens, timeout_s, logits_processor=logits_processor, **scores
                    )
                )
        except QueueFull as err:
            self.cancel()
            raise APIError(429, f"server busy: {err}; retry later", "rate_limit_error", code="queue_full") from None
        except BatcherStopped as err:
            self.cancel()
            raise APIError(503, str(err), "server_error", code="shutting_down") from None
        except TissLMError as err:
            self.cancel()
            raise APIError(400, str(err), param="max_tokens", code="context_length_exceeded") from None

    def _deliver(self, index: int, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop has closed: the server is going down
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

    def cancel(self) -> None:
        for request in self.requests:
            self.engine.cancel(request)

    def usage(self) -> Usage:
        completion = sum(self.completion_tokens)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )

    async def updates(self) -> AsyncIterator[Update]:
        """Text as it settles, choice by choice; raises APIError for a timeout or a failure.

        Events that piled up while the client was being served are merged into one update per
        choice: under load the server then sends fewer, larger chunks instead of falling behind.
        A choice's echoed prompt comes with its first event (the prompt's scores, when asked).
        """
        pending = set(range(len(self.requests)))
        echoing = set(pending) if self.echo is not None else set()
        while pending:
            events = [await self.queue.get()]
            while not self.queue.empty():
                events.append(self.queue.get_nowait())
            pieces: dict[int, list[str]] = {}
            echoed: dict[int, str] = {}
            tokens: dict[int, list[Scored]] = {}
            endings: dict[int, str] = {}
            for index, event in events:
                if index not in pending:
                    continue  # the engine's events after a stop string ended the choice
                stream = self.texts[index]
                text = pieces.setdefault(index, [])
                scored = tokens.setdefault(index, [])
                if index in echoing:
                    echoing.discard(index)
                    echoed[index] = self.echo[index]
                if isinstance(event, PromptLogprobs):
                    scored += self._prompt(index, event)
                    continue
                if isinstance(event, Token):
                    if self.scoring:
                        self.scored[index].append(Scored(event.id, self.offsets[index].next(event.id), event.logprob))
                    text.append(stream.add(event.id))
                    if stream.stopped:
                        self.engine.cancel(self.requests[index])
                        pending.discard(index)
                        self.completion_tokens[index] = len(stream.ids)
                        endings[index] = "stop"
                    (scored if self.guards is None else self.held[index]).extend(self._released(index))
                    continue
                pending.discard(index)
                self.completion_tokens[index] = event.completion_tokens
                if event.reason not in ("stop", "length"):
                    raise _failure(event)
                text.append(stream.finish())
                (scored if self.guards is None else self.held[index]).extend(self._released(index))
                endings[index] = event.reason
            for index, text in pieces.items():
                joined = "".join(text)
                results = None
                if self.guards is not None:
                    joined = self._guard(index, joined, pending, endings)
                    if index in endings:
                        results = self.guards[index].verdict.decisions()
                        tokens[index] += self._cleared(index)
                if joined or index in echoed or index in endings or tokens[index]:
                    self.outputs[index] += joined
                    released = tokens[index] if self.scoring else None
                    text = echoed.get(index, "") + joined
                    yield Update(index, text, endings.get(index), released, results)

    def _guard(self, index: int, text: str, pending: set[int], endings: dict[int, str]) -> str:
        """What the choice's guard lets out of its new text; a block ends the choice, and its generation."""
        guard = self.guards[index]
        released = guard.add(text)
        if index in endings and not guard.blocked:
            released += guard.finish()
        if guard.blocked:
            if index in pending:
                self.engine.cancel(self.requests[index])
                pending.discard(index)
                self.completion_tokens[index] = len(self.texts[index].ids)
            endings[index] = "content_filter"
        return released

    def _cleared(self, index: int) -> list[Scored]:
        """The choice's held tokens, less those in a span the guard redacted or blocked, or past its cut."""
        guard, held = self.guards[index], self.held[index]
        self.held[index] = []
        start_of_text = len(self.echo[index]) if self.echo is not None else 0
        cut = guard.verdict.blocked_at if guard.blocked else len(guard.raw)
        removed = [(f.start, f.end) for f in guard.verdict.findings if f.action in ("redact", "block")]
        cleared = []
        for position, token in enumerate(held):
            start = token.offset - start_of_text
            end = held[position + 1].offset - start_of_text if position + 1 < len(held) else len(guard.raw)
            if start < cut and not any(start < right and left < end for left, right in removed):
                cleared.append(token)
        return cleared

    def filter_results(self) -> list[list[dict]]:
        """Each choice's output filter decisions so far, for the audit log."""
        return [guard.verdict.decisions() for guard in self.guards] if self.guards is not None else []

    def _prompt(self, index: int, event: PromptLogprobs) -> list[Scored]:
        """The echoed prompt's tokens, scored from the second on."""
        offsets = TextOffsets(self.vocabulary, written=True)
        scores = (None, *event.logprobs)
        return [Scored(t, offsets.next(t), lp) for t, lp in zip(self.prompts[index], scores, strict=True)]

    def _released(self, index: int) -> list[Scored]:
        """The scored tokens whose text the choice's stream has released since the last call."""
        start, end = self.sent_tokens[index], self.texts[index].released_tokens
        self.sent_tokens[index] = end
        return self.scored[index][start:end]


def _failure(event: Finished) -> APIError:
    if event.reason == "timeout":
        return APIError(504, "the request timed out before it finished generating", "timeout", code="request_timeout")
    if event.reason == "cancelled":
        return APIError(503, "the generation was cancelled: the server is shutting down", "server_error")
    return APIError(500, f"generation failed: {event.error}", "server_error")


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel the job's generations when the client goes away: with the body read, receive() returns
    only at a disconnect (or once the response is complete, when cancelling changes nothing)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def respond(
    request: Request, job: Job, shape: Shape, body: CompletionRequest | ChatRequest
) -> BaseModel | StreamingResponse:
    """Wait for all of the job's updates and answer once, or stream them as SSE chunks."""
    note(request, job=job)
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    if not body.stream:
        try:
            choices = [Update(i, "", None, [] if job.scoring else None) for i in range(len(job.requests))]
            async for update in job.updates():
                choices[update.index].extend(update)
            return shape.whole(choices, job.usage())
        finally:
            watcher.cancel()
            job.cancel()
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    events = _events(job, shape, watcher, include_usage)
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


async def _events(job: Job, shape: Shape, watcher: asyncio.Task, include_usage: bool) -> AsyncIterator[str]:
    """The SSE stream of a job: its chunks, an error event if it fails, then [DONE]."""
    try:
        for opening in shape.opening(len(job.requests)):
            yield sse(opening)
        async for update in job.updates():
            yield sse(shape.chunk(update))
        if include_usage:
            yield sse(shape.usage_chunk(job.usage()))
    except APIError as err:
        yield sse(err.response())
    finally:
        watcher.cancel()
        job.cancel()
    yield DONE

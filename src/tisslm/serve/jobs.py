"""The generations of one HTTP request, from the engine's thread to the client: one body, or an SSE stream.

Engine callbacks run on the engine thread and only hand events over to the event loop; the text
is decoded and checked for stop strings here, on the loop. A client that goes away cancels its
generations, and their slots free before the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from tokenizers import Tokenizer

from tisslm.core.errors import TissLMError
from tisslm.core.sampling import SamplingParams
from tisslm.serve.auditing import note
from tisslm.serve.engine import Engine, EngineStopped, Event, Finished, QueueFull, Token
from tisslm.serve.engine import Request as EngineRequest
from tisslm.serve.schemas import APIError, ChatRequest, CompletionRequest, Usage
from tisslm.serve.text import TextStream

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel) -> str:
    # ASCII only: a raw U+2028 or U+0085 in the text would end the line for clients that split on them.
    return f"data: {json.dumps(payload.model_dump(mode='json'), separators=(',', ':'))}\n\n"


@dataclass
class Update:
    """A step of one choice: new text, and the finish reason once it ends."""

    index: int
    text: str
    finish_reason: str | None


class Shape(Protocol):
    """How an endpoint shapes its answers: streamed chunks, or one body at the end."""

    def opening(self, choices: int) -> list[BaseModel]:
        """The chunks a stream starts with, before any text."""

    def chunk(self, update: Update) -> BaseModel:
        """The chunk of one update."""

    def usage_chunk(self, usage: Usage) -> BaseModel:
        """The last chunk of a stream whose client asked for the usage."""

    def whole(self, texts: list[str], reasons: list[str | None], usage: Usage) -> BaseModel:
        """The body of an answer that is not streamed."""


class Job:
    """The generations of one HTTP request, one per prompt, their engine events merged into one queue."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        prompts: list[list[int]],
        params: SamplingParams,
        stop_tokens: list[int],
        stop_strings: list[str],
        timeout_s: float,
    ):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.texts = [TextStream(tokenizer, stop_strings) for _ in prompts]
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = [0] * len(prompts)
        self.outputs = [""] * len(prompts)  # each choice's text so far, for the audit log
        self.requests: list[EngineRequest] = []
        try:
            for index, prompt in enumerate(prompts):
                on_event = partial(self._deliver, index)
                self.requests.append(engine.submit(prompt, params, on_event, stop_tokens, timeout_s))
        except QueueFull as err:
            self.cancel()
            raise APIError(429, f"server busy: {err}; retry later", "rate_limit_error", code="queue_full") from None
        except EngineStopped as err:
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
        """
        pending = set(range(len(self.requests)))
        while pending:
            events = [await self.queue.get()]
            while not self.queue.empty():
                events.append(self.queue.get_nowait())
            pieces: dict[int, list[str]] = {}
            endings: dict[int, str] = {}
            for index, event in events:
                if index not in pending:
                    continue  # the engine's events after a stop string ended the choice
                stream = self.texts[index]
                text = pieces.setdefault(index, [])
                if isinstance(event, Token):
                    text.append(stream.add(event.id))
                    if stream.stopped:
                        self.engine.cancel(self.requests[index])
                        pending.discard(index)
                        self.completion_tokens[index] = len(stream.ids)
                        endings[index] = "stop"
                    continue
                pending.discard(index)
                self.completion_tokens[index] = event.completion_tokens
                if event.reason not in ("stop", "length"):
                    raise _failure(event)
                text.append(stream.finish())
                endings[index] = event.reason
            for index, text in pieces.items():
                if any(text) or index in endings:
                    joined = "".join(text)
                    self.outputs[index] += joined
                    yield Update(index, joined, endings.get(index))


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
            texts, reasons = [""] * len(job.requests), [None] * len(job.requests)
            async for update in job.updates():
                texts[update.index] += update.text
                reasons[update.index] = update.finish_reason
            return shape.whole(texts, reasons, job.usage())
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
            if update.text or update.finish_reason:
                yield sse(shape.chunk(update))
        if include_usage:
            yield sse(shape.usage_chunk(job.usage()))
    except APIError as err:
        yield sse(err.response())
    finally:
        watcher.cancel()
        job.cancel()
    yield DONE

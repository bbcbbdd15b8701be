"""The HTTP server: an OpenAI-compatible API over the continuous-batching engine, and a web page.

Routes: POST /v1/completions and /v1/chat/completions (streamed as server-sent events when
`stream` is true), GET /v1/models, GET /health, GET /metrics (Prometheus), POST /v1/attention
(per layer and head attention weights of a short text, for the page) and GET / (the page).

Bodies are read and parsed here rather than by FastAPI, so that every failure gets an
OpenAI-style 4xx: 413 over the size cap, 400 for bytes that are not UTF-8, for JSON that does not
parse or validate, for a prompt over the limits; 404 for an unknown model; 429 when the queue is
full; 504 when a request outlives its timeout. A client that goes away cancels its generations,
and their slots free before the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from tokenizers import Tokenizer

from tisslm.config import GenerateParams, ServeParams
from tisslm.errors import TissLMError
from tisslm.serve.attention import attention_for_text
from tisslm.serve.engine import Engine, EngineStopped, Event, Finished, QueueFull, Token
from tisslm.serve.engine import Request as EngineRequest
from tisslm.serve.schemas import (
    APIError,
    AttentionRequest,
    ChatRequest,
    CompletionRequest,
    parse_body,
)
from tisslm.serve.text import CHAT_STOP, TextStream, render_chat
from tisslm.tokenizer import END_OF_TEXT

ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/attention"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    # ASCII only: a raw U+2028 or U+0085 in the text would end the line for clients that split on them.
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


@dataclass
class Update:
    """A step of one choice: new text, and the finish reason once it ends."""

    index: int
    text: str
    finish_reason: str | None


@dataclass
class Shape:
    """How an endpoint shapes its answers: streamed chunks, or one body at the end."""

    chunk: Callable[[Update], dict]  # the SSE chunk of an update
    opening: Callable[[int], list[dict]]  # chunks before any text, given the number of choices
    usage_chunk: Callable[[dict], dict]  # the last chunk, when the client asked for usage
    whole: Callable[[list[str], list[str | None]], dict]  # the body of a non-streamed answer: texts, finish reasons


class Job:
    """The generations of one HTTP request, one per prompt, their engine events merged into one queue.

    Engine callbacks run on the engine thread and only hand events over to the event loop; the
    text is decoded and checked for stop strings here, on the loop.
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        prompts: list[list[int]],
        params: GenerateParams,
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

    def usage(self) -> dict[str, int]:
        completion = sum(self.completion_tokens)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

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
                    yield Update(index, "".join(text), endings.get(index))


def _failure(event: Finished) -> APIError:
    if event.reason == "timeout":
        return APIError(504, "the request timed out before it finished generating", "timeout", code="request_timeout")
    if event.reason == "cancelled":
        return APIError(503, "the generation was cancelled: the server is shutting down", "server_error")
    return APIError(500, f"generation failed: {event.error}", "server_error")


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 413 past `limit` bytes, 400 for bytes that are not UTF-8 or not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit}", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise APIError(
            400, f"request body is not valid UTF-8: {err.reason} at byte {err.start}", code="invalid_encoding"
        ) from None

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(text, parse_constant=no_constants)
    except (json.JSONDecodeError, ValueError) as err:
        raise APIError(400, f"request body is not valid JSON: {err}", code="invalid_json") from None


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel the job's generations when the client goes away: with the body read, receive() returns
    only at a disconnect (or once the response is complete, when cancelling changes nothing)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


class RequestMetrics:
    """ASGI middleware counting requests by route and status, and timing them to their last byte.

    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer the streams through
    a task of its own; this one only watches the messages go by.
    """

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def watch(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_latency.labels(route).observe(time.perf_counter() - started)


def create_app(engine: Engine, tokenizer: Tokenizer, settings: ServeParams) -> FastAPI:
    """The server's FastAPI app; it starts the engine when it starts and stops it when it stops."""
    metrics = engine.metrics
    config = engine.model.config
    end_of_text = tokenizer.token_to_id(END_OF_TEXT)
    page = files("tisslm.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="TissLM", lifespan=lifespan, docs_url="/docs", redoc_url=None)

    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(APIError(err.status_code, str(err.detail), code=code).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, err: Exception) -> JSONResponse:
        body = APIError(500, f"internal error: {type(err).__name__}", "server_error").body()
        return JSONResponse(body, status_code=500)

    def encode(text: str, param: str) -> list[int]:
        try:
            ids = tokenizer.encode(text).ids
        except TypeError:  # tokenizers' answer to a lone surrogate, from a "\\ud800" escape in the JSON
            raise APIError(400, f"{param}: not valid Unicode text", param=param, code="invalid_encoding") from None
        if not ids:
            raise APIError(400, f"{param}: empty", param=param, code="invalid_value")
        if len(ids) > settings.max_prompt_tokens:
            raise APIError(
                400,
                f"{param}: {len(ids)} tokens, more than the limit of {settings.max_prompt_tokens}",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            message = f"The model `{name}` does not exist; this server serves `{settings.model_name}`"
            raise APIError(404, message, param="model", code="model_not_found")

    def sampling(body: CompletionRequest | ChatRequest, max_tokens: int | None, longest_prompt: int) -> GenerateParams:
        if max_tokens is None:  # chat: as long as the cap and the context allow
            max_tokens = max(0, min(settings.max_tokens, config.max_seq_len - longest_prompt))
        if max_tokens > settings.max_tokens:
            message = f"max_tokens={max_tokens} exceeds this server's limit of {settings.max_tokens}"
            raise APIError(400, message, param="max_tokens", code="invalid_value")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options")
        return body.generate_params(max_tokens)

    def start_job(body, prompts: list[list[int]], params: GenerateParams, stop_strings: list[str]) -> Job:
        stop_tokens = [] if body.ignore_eos or end_of_text is None else [end_of_text]
        return Job(engine, tokenizer, prompts, params, stop_tokens, stop_strings, settings.request_timeout_s)

    async def respond(request: Request, job: Job, body: CompletionRequest | ChatRequest, shape: Shape) -> Response:
        """Stream the job's updates as SSE chunks, or wait for all of them and answer once."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        if not body.stream:
            try:
                texts, reasons = [""] * len(job.requests), [None] * len(job.requests)
                async for update in job.updates():
                    texts[update.index] += update.text
                    reasons[update.index] = update.finish_reason
                return JSONResponse(shape.whole(texts, reasons))
            finally:
                watcher.cancel()
                job.cancel()

        async def events() -> AsyncIterator[str]:
            try:
                for opening in shape.opening(len(job.requests)):
                    yield sse(opening)
                async for update in job.updates():
                    if update.text or update.finish_reason:
                        yield sse(shape.chunk(update))
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield sse(shape.usage_chunk(job.usage()))
            except APIError as err:
                yield sse(err.body())
            finally:
                watcher.cancel()
                job.cancel()
            yield DONE

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_body(CompletionRequest, await read_json(request, settings.max_body_bytes))
        check_model(body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        prompts = [encode(text, "prompt") for text in texts]
        params = sampling(body, 16 if body.max_tokens is None else body.max_tokens, max(map(len, prompts)))
        job = start_job(body, prompts, params, body.stop_strings())
        ident, stamp = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": stamp, "model": settings.model_name}

        def choice(index: int, text: str, reason: str | None) -> dict:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

        def whole(texts: list[str], reasons: list[str | None]) -> dict:
            choices = [choice(i, t, r) for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
            return head | {"choices": choices, "usage": job.usage()}

        shape = Shape(
            chunk=lambda u: head | {"choices": [choice(u.index, u.text, u.finish_reason)]},
            opening=lambda n: [],
            usage_chunk=lambda usage: head | {"choices": [], "usage": usage},
            whole=whole,
        )
        return await respond(request, job, body, shape)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_body(ChatRequest, await read_json(request, settings.max_body_bytes))
        check_model(body.model)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
        prompt = encode(render_chat((m.role, m.content) for m in body.messages), "messages")
        params = sampling(body, body.max_completion_tokens or body.max_tokens, len(prompt))
        job = start_job(body, [prompt], params, [*body.stop_strings(), *CHAT_STOP])
        ident, stamp = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "object": "chat.completion.chunk", "created": stamp, "model": settings.model_name}

        def delta(u: Update) -> dict:
            content = {"content": u.text} if u.text else {}
            return head | {
                "choices": [{"index": u.index, "delta": content, "logprobs": None, "finish_reason": u.finish_reason}]
            }

        def role(index: int) -> dict:
            message = {"role": "assistant", "content": ""}
            return head | {"choices": [{"index": index, "delta": message, "logprobs": None, "finish_reason": None}]}

        def whole(texts: list[str], reasons: list[str | None]) -> dict:
            choices = [
                {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ]
            return head | {"object": "chat.completion", "choices": choices, "usage": job.usage()}

        shape = Shape(
            chunk=delta,
            opening=lambda n: [role(i) for i in range(n)],
            usage_chunk=lambda usage: head | {"choices": [], "usage": usage},
            whole=whole,
        )
        return await respond(request, job, body, shape)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "tisslm"}
        return {"object": "list", "data": [card | {"max_model_len": config.max_seq_len}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        state = {
            "status": "ok" if engine.alive else "unavailable",
            "model": settings.model_name,
            "active": engine.active_count,
            "waiting": engine.waiting_count,
            "max_batch": engine.max_batch,
            "max_queue": engine.max_queue,
        }
        return JSONResponse(state, status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/v1/attention")
    async def attention(request: Request) -> dict:
        body = parse_body(AttentionRequest, await read_json(request, settings.max_body_bytes))
        try:
            maps = await run_in_threadpool(
                attention_for_text, engine.model, tokenizer, body.text, settings.attention_max_tokens
            )
        except TissLMError as err:
            raise APIError(400, str(err), param="text", code="invalid_value") from None
        return maps.to_json()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app

"""The HTTP routes: thin routers that take a request apart and hand it to the app's `Serving`.

Bodies are read and parsed here rather than by FastAPI, so that every failure gets an
OpenAI-style 4xx: 413 over the size cap, 400 for bytes that are not UTF-8 and for JSON that does
not parse or validate. What a route answers is declared on it (`response_model`, `responses`,
and the `openapi` helpers for what FastAPI cannot see), so /docs and /openapi.json describe it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel

from tisslm.serve.auditing import note
from tisslm.serve.metrics import ServeMetrics
from tisslm.serve.openapi import ERRORS, errors, event_stream, request_body
from tisslm.serve.schemas import (
    APIError,
    AttentionRequest,
    AttentionResponse,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatRequest,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Health,
    KnowledgeBaseInfo,
    ModelList,
    RetrieveRequest,
    RetrieveResponse,
    parse_body,
)
from tisslm.serve.serving import Serving

Model = TypeVar("Model", bound=BaseModel)


def get_serving(request: Request) -> Serving:
    """The app's serving object, which `create_app` keeps on `app.state`."""
    return request.app.state.serving


ServingDep = Annotated[Serving, Depends(get_serving)]


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


def json_body(model: type[Model]) -> Callable[[Request, Serving], Awaitable[Model]]:
    """A dependency giving the body validated as `model` (documented by `openapi.request_body`)."""

    async def parse(request: Request, serving: ServingDep) -> Model:
        body = parse_body(model, await read_json(request, serving.settings.max_body_bytes))
        note(request, body=body)
        return body

    return parse


CompletionBody = Annotated[CompletionRequest, Depends(json_body(CompletionRequest))]
ChatBody = Annotated[ChatRequest, Depends(json_body(ChatRequest))]
AttentionBody = Annotated[AttentionRequest, Depends(json_body(AttentionRequest))]
RetrieveBody = Annotated[RetrieveRequest, Depends(json_body(RetrieveRequest))]
GROUNDING = {
    400: ERRORS[400] + "; or `retrieve` was asked of a server without a knowledge base (code `no_knowledge_base`)"
}
GENERATION_ERRORS = errors(400, 404, 413, 429, 500, 503, 504, described=GROUNDING)
NO_KB = {404: "The server has no knowledge base (it was started without `--kb`): code `no_knowledge_base`"}
PROMETHEUS_TEXT = {"content": {ServeMetrics.content_type: {"schema": {"type": "string"}}}}

completions = APIRouter(tags=["completions"])
chat = APIRouter(tags=["chat"])
models = APIRouter(tags=["models"])
monitoring = APIRouter(tags=["monitoring"])
knowledge = APIRouter(tags=["knowledge base"])
web = APIRouter(tags=["web page"])


@completions.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses=event_stream(CompletionChunk) | GENERATION_ERRORS,
    openapi_extra=request_body(CompletionRequest),
)
async def create_completion(
    request: Request, serving: ServingDep, body: CompletionBody
) -> CompletionResponse | StreamingResponse:
    """Continue each prompt; streamed as server-sent events when `stream` is true."""
    return await serving.complete(request, body)


@chat.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses=event_stream(ChatCompletionChunk) | GENERATION_ERRORS,
    openapi_extra=request_body(ChatRequest),
)
async def create_chat_completion(
    request: Request, serving: ServingDep, body: ChatBody
) -> ChatCompletionResponse | StreamingResponse:
    """Reply to a conversation; streamed as server-sent events when `stream` is true."""
    return await serving.chat(request, body)


@models.get("/v1/models", response_model=ModelList)
async def list_models(serving: ServingDep) -> ModelList:
    """The one model this server serves."""
    return serving.models()


@monitoring.get("/health", response_model=Health, responses={503: {"model": Health, "description": "Stopping"}})
async def health(response: Response, serving: ServingDep) -> Health:
    """The engine's state and load; 503 once it no longer takes requests."""
    state = serving.health()
    if state.status != "ok":
        response.status_code = 503
    return state


@monitoring.get("/metrics", response_class=Response, responses={200: PROMETHEUS_TEXT})
async def metrics(serving: ServingDep) -> Response:
    """Requests, tokens, queue depth and latencies, in Prometheus' text format."""
    return Response(serving.metrics.render(), media_type=serving.metrics.content_type)


@knowledge.post(
    "/v1/retrieve",
    response_model=RetrieveResponse,
    responses=errors(400, 404, 413, described=NO_KB),
    openapi_extra=request_body(RetrieveRequest),
)
async def retrieve(serving: ServingDep, body: RetrieveBody) -> RetrieveResponse:
    """The `k` chunks of the knowledge base that best match `query`, best first (TissLM's extension)."""
    return await serving.retrieve(body)


@knowledge.get("/v1/kb", response_model=KnowledgeBaseInfo, responses=errors(404, described=NO_KB))
async def knowledge_base(serving: ServingDep) -> KnowledgeBaseInfo:
    """The knowledge base the server was started with: its documents, chunks and embedding model."""
    return await serving.kb_info()


@web.post(
    "/v1/attention",
    response_model=AttentionResponse,
    responses=errors(400, 413),
    openapi_extra=request_body(AttentionRequest),
)
async def attention(serving: ServingDep, body: AttentionBody) -> AttentionResponse:
    """Attention weights of every layer and head over a short text, for the page's attention view."""
    return await serving.attention(body)


@web.get("/", response_class=HTMLResponse)
async def index(serving: ServingDep) -> HTMLResponse:
    """The demo page: streamed completions and attention maps, plain HTML and JavaScript."""
    return HTMLResponse(serving.page)


ROUTERS = (completions, chat, models, monitoring, knowledge, web)

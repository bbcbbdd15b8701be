"""The server's FastAPI app: a `Serving` object on `app.state`, the routers of `routes` over it.

Routes: POST /v1/completions and /v1/chat/completions (streamed as server-sent events when
`stream` is true), GET /v1/models, GET /health, GET /metrics (Prometheus), POST /v1/attention
(per layer and head attention weights of a short text, for the page) and GET / (the page);
with a knowledge base (`tisslm serve --kb`), POST /v1/retrieve (its best chunks for a query) and
GET /v1/kb (what it holds), both 404 on a server without one. GET /openapi.json describes them
all, and /docs renders that description. Started with API keys (`--api-key`), the /v1/ routes answer
401 without one (`access`), and the document declares the bearer scheme; with `--audit-log`, each
/v1/ request is recorded in a hash-chained log (`auditing`).

Every failure is answered with an OpenAI-style error body (`schemas.ErrorResponse`): the
APIErrors of the routes and of `Serving` with their own status (400 for a bad body or prompt, 404
for an unknown model or a missing knowledge base, 413, 429 when the queue is full, 504 when a
request outlives its timeout),
Starlette's 404 and 405 with theirs, and anything else as a 500.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from tokenizers import Tokenizer

from tisslm import __version__
from tisslm.core.chat import ChatTemplate
from tisslm.core.config import ServeParams
from tisslm.safety.audit import AuditLog
from tisslm.safety.filters import ContentFilter
from tisslm.safety.watermark import Watermark
from tisslm.serve.access import Authenticator
from tisslm.serve.auditing import AuditTrail
from tisslm.serve.batching import Batcher
from tisslm.serve.metrics import RequestMetrics
from tisslm.serve.openapi import add_components, add_security
from tisslm.serve.routes import ROUTERS
from tisslm.serve.schemas import APIError
from tisslm.serve.serving import Serving

if TYPE_CHECKING:
    from tisslm.kb import KnowledgeBase

DESCRIPTION = "An OpenAI-compatible API over TissLM's continuous-batching engine, and a demo page."


def create_app(
    engine: Batcher,
    tokenizer: Tokenizer,
    settings: ServeParams,
    kb: KnowledgeBase | None = None,
    api_keys: Sequence[str] = (),
    audit: AuditLog | None = None,
    content_filter: ContentFilter | None = None,
    watermark: Watermark | None = None,
    chat_template: ChatTemplate | None = None,
) -> FastAPI:
    """The server's FastAPI app; it starts the engine when it starts and stops it when it stops.
    `kb`, an open knowledge base the caller keeps and closes, serves retrieval and grounding. With
    `api_keys`, the /v1/ routes need one of them as a bearer token (`access`); with `audit`, each
    /v1/ request is recorded in that log (`auditing`), which the caller closes. With
    `content_filter`, prompts and outputs are filtered by its policy; with `watermark`, every
    sampled token is watermarked. `chat_template` (the model directory's, `ChatTemplate.load`)
    formats the chat route's conversations; None: the ChatML default."""
    app = FastAPI(
        title="TissLM",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.serving = Serving(engine, tokenizer, settings, kb, content_filter, watermark, chat_template)
    for router in ROUTERS:
        app.include_router(router)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    # The last added runs first: metrics count every answer (401s too), the audit records the refusals.
    app.add_middleware(Authenticator, keys=list(api_keys))
    if audit is not None:
        app.add_middleware(AuditTrail, log=audit)
    app.add_middleware(RequestMetrics, metrics=engine.metrics, routes=served_paths())
    add_components(app)
    if api_keys:
        add_security(app)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run the engine's thread while the server runs; stopping it ends what is in flight as cancelled."""
    engine = app.state.serving.engine
    engine.start()
    try:
        yield
    finally:
        await run_in_threadpool(engine.stop)


def served_paths() -> set[str]:
    """The paths of the API and the page, which the request metrics count by name (not /docs and the like)."""
    return {route.path for router in ROUTERS for route in router.routes if isinstance(route, APIRoute)}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.response().model_dump(mode="json"), status_code=err.status)


async def api_error(_: Request, err: APIError) -> JSONResponse:
    return error_response(err)


async def http_error(_: Request, err: HTTPException) -> JSONResponse:
    """Starlette's own errors (no such route, wrong method) in the API's error shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    return error_response(APIError(err.status_code, str(err.detail), code=code))


async def internal_error(_: Request, err: Exception) -> JSONResponse:
    """A bug: a 500 naming the exception's type, never its message or a traceback."""
    return error_response(APIError(500, f"internal error: {type(err).__name__}", "server_error"))

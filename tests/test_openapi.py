"""The server's OpenAPI document: served over HTTP, valid, and describing the API the app really serves.

One app, served by uvicorn on a loopback port in a thread of this process, so that its routes
(`app.routes`) and what it answers can be set against the document it publishes. It has a
knowledge base (as with `tisslm serve --kb`), so that retrieval and grounded answers are checked too.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import uvicorn
from conftest import make_model
from fastapi.routing import APIRoute, iter_route_contexts
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from serving import KB_QUERY, SERVE_MODEL, build_tiny_kb

from tisslm.core.config import ServeParams
from tisslm.core.tokenizer import byte_level_tokenizer
from tisslm.kb import KnowledgeBase
from tisslm.serve.app import create_app
from tisslm.serve.batching import Batcher
from tisslm.serve.server import bind

API = {
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("POST", "/v1/attention"),
    ("POST", "/v1/retrieve"),
    ("GET", "/v1/kb"),
    ("GET", "/"),
}
# What a JSON route's answer must have, beyond validating against its documented schema.
RESPONSE_FIELDS = {
    "/v1/completions": {"id", "object", "created", "model", "choices", "usage"},
    "/v1/chat/completions": {"id", "object", "created", "model", "choices", "usage"},
    "/v1/models": {"object", "data"},
    "/health": {"status", "model", "active", "waiting", "max_batch", "max_queue"},
    "/v1/attention": {"tokens", "n_layers", "n_heads", "weights"},
    "/v1/retrieve": {"object", "data"},
    "/v1/kb": {"object", "documents", "chunks", "source_bytes", "built_at", "embedding_model"},
}
REQUEST_FIELDS = {
    "/v1/completions": "prompt",
    "/v1/chat/completions": "messages",
    "/v1/attention": "text",
    "/v1/retrieve": "query",
}
ASK = [{"role": "user", "content": "hi"}]
ASK_KB = [{"role": "user", "content": KB_QUERY}]  # a chat grounded in the app's knowledge base
STREAMED = {"/v1/completions": "CompletionChunk", "/v1/chat/completions": "ChatCompletionChunk"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    engine = Batcher(make_model(**SERVE_MODEL), max_batch=2, vocab_limit=byte_level_tokenizer().get_vocab_size())
    with KnowledgeBase.open(build_tiny_kb(tmp_path_factory.mktemp("kb"))) as kb:
        yield create_app(engine, byte_level_tokenizer(), ServeParams(max_tokens=64), kb)


@pytest.fixture(scope="module")
def url(app):
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def document(url) -> dict:
    response = httpx.get(f"{url}/openapi.json", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    return response.json()


def resolve(document: dict, ref_or_schema: dict) -> dict:
    ref = ref_or_schema.get("$ref", "")
    return document["components"]["schemas"][ref.removeprefix("#/components/schemas/")] if ref else ref_or_schema


def check(document: dict, body, ref_or_schema: dict) -> None:
    """Validate a body against a documented schema, its references resolved in the document's components."""
    OAS31Validator({**ref_or_schema, "components": document["components"]}).validate(body)


def test_the_document_is_valid_openapi(document):
    validate(document)
    assert document["openapi"].startswith("3.1") and document["info"]["title"] == "TissLM"


def test_it_documents_every_route_the_app_serves(app, document):
    # FastAPI keeps included routers as a tree in app.routes; iter_route_contexts flattens it.
    contexts = list(iter_route_contexts(app.routes))
    served = {(method, c.path) for c in contexts if isinstance(c.original_route, APIRoute) for method in c.methods}
    documented = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    assert served == documented == API
    undocumented = {c.path for c in contexts if not isinstance(c.original_route, APIRoute)}
    assert undocumented == {"/openapi.json", "/docs", "/docs/oauth2-redirect"}


def test_post_routes_document_their_request_bodies(document):
    for path, field in REQUEST_FIELDS.items():
        body = document["paths"][path]["post"]["requestBody"]
        model = resolve(document, body["content"]["application/json"]["schema"])
        assert body["required"] and field in model["required"], path
        assert model["additionalProperties"] is False, path  # unknown arguments are refused, as documented
        statuses = document["paths"][path]["post"]["responses"]
        assert "400" in statuses and "422" not in statuses, path  # bad bodies get OpenAI's 400, not FastAPI's 422


def test_json_routes_document_their_response_schemas(document):
    for path, fields in RESPONSE_FIELDS.items():
        (operation,) = document["paths"][path].values()
        model = resolve(document, operation["responses"]["200"]["content"]["application/json"]["schema"])
        assert fields <= set(model["required"]), path
    for path, chunk in STREAMED.items():
        event = document["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
        assert {"$ref": f"#/components/schemas/{chunk}"} in event["anyOf"]
    assert "choices" in resolve(document, {"$ref": "#/components/schemas/CompletionResponse"})["properties"]
    for name in ("CompletionResponse", "CompletionChunk", "ChatCompletionResponse", "ChatCompletionChunk"):
        model = resolve(document, {"$ref": f"#/components/schemas/{name}"})  # sent only for a grounded prompt
        assert {"sources", "context_truncated"} <= set(model["properties"]) - set(model["required"]), name
    for name in ("CompletionRequest", "ChatRequest"):
        assert "retrieve" in resolve(document, {"$ref": f"#/components/schemas/{name}"})["properties"], name
    scoring = {"CompletionRequest": {"logprobs", "echo"}, "ChatRequest": {"logprobs", "top_logprobs"}}
    for name, fields in scoring.items():
        assert fields <= set(resolve(document, {"$ref": f"#/components/schemas/{name}"})["properties"]), name
    extensions = {"CompletionLogprobs": "entropies", "ChatTokenLogprob": "entropy"}  # TissLM's, documented
    for name, field in extensions.items():
        assert resolve(document, {"$ref": f"#/components/schemas/{name}"})["properties"][field]["description"]
    assert "text/html" in document["paths"]["/"]["get"]["responses"]["200"]["content"]
    assert any(t.startswith("text/plain") for t in document["paths"]["/metrics"]["get"]["responses"]["200"]["content"])


def documented_response(document: dict, method: str, path: str, status: int, media: str = "application/json") -> dict:
    return document["paths"][path][method.lower()]["responses"][str(status)]["content"][media]["schema"]


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/v1/completions", {"prompt": ["def ", "x"], "max_tokens": 8, "seed": 1}),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}),
        ("GET", "/v1/models", None),
        ("GET", "/health", None),
        ("POST", "/v1/attention", {"text": "def f"}),
        ("POST", "/v1/retrieve", {"query": KB_QUERY, "k": 3}),
        ("POST", "/v1/retrieve", {"query": "   "}),  # 400
        ("GET", "/v1/kb", None),
        ("POST", "/v1/completions", {"prompt": "def ", "max_tokens": 4, "retrieve": {"k": 2}}),
        ("POST", "/v1/chat/completions", {"messages": ASK_KB, "max_tokens": 4, "retrieve": {"mode": "bm25"}}),
        ("POST", "/v1/completions", {"prompt": ["def ", "x"], "max_tokens": 4, "logprobs": 2, "echo": True}),
        ("POST", "/v1/completions", {"prompt": "def f(x):", "max_tokens": 0, "logprobs": 1, "echo": True}),
        ("POST", "/v1/chat/completions", {"messages": ASK, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}),
        ("POST", "/v1/chat/completions", {"messages": ASK, "top_logprobs": 2}),  # 400: logprobs not asked
        ("POST", "/v1/completions", {"prompt": "x", "logprobs": 6}),  # 400
        ("POST", "/v1/completions", {"prompt": "x", "max_tokens": "8"}),  # 400
        ("POST", "/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}),  # 404
    ],
)
def test_real_answers_match_their_documented_schemas(url, document, method, path, body):
    response = httpx.request(method, f"{url}{path}", json=body, timeout=60)
    check(document, response.json(), documented_response(document, method, path, response.status_code))
    if body and "retrieve" in body:
        assert response.status_code == 200 and response.json()["sources"], response.text
    if body and body.get("logprobs") is not None and response.status_code == 200:
        assert all(choice["logprobs"] for choice in response.json()["choices"]), response.text


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": "def ", "max_tokens": 8}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}),
        ("/v1/completions", {"prompt": "def ", "max_tokens": 8, "retrieve": {"query": KB_QUERY}}),
        ("/v1/chat/completions", {"messages": ASK_KB, "max_tokens": 8, "retrieve": {}}),
        ("/v1/completions", {"prompt": "def ", "max_tokens": 8, "logprobs": 3, "echo": True}),
        ("/v1/chat/completions", {"messages": ASK, "max_tokens": 8, "logprobs": True, "top_logprobs": 1}),
    ],
)
def test_streamed_events_match_the_documented_event_schema(url, document, path, body):
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as response:
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert lines[-1] == "[DONE]" and len(lines) > 2
    event = documented_response(document, "POST", path, 200, "text/event-stream")
    for line in lines[:-1]:
        check(document, json.loads(line), event)
    if "retrieve" in body:
        assert json.loads(lines[0])["sources"]  # the first chunk cites the sources
    if "logprobs" in body:
        assert any(choice["logprobs"] for line in lines[:-1] for choice in json.loads(line)["choices"])


def test_docs_page_renders_the_document(url):
    page = httpx.get(f"{url}/docs", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "swagger-ui" in page.text and "/openapi.json" in page.text

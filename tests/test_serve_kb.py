"""`tisslm serve --kb`: retrieval over HTTP and completions grounded in the knowledge base, on a
real server process with a tiny model and an index of a few planted functions (serving.KB_CORPUS)."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from openai import OpenAI
from serving import KB_CORPUS, KB_QUERY, ServerProcess, build_tiny_kb, save_tiny_model

from tisslm.core.chat import ChatTemplate
from tisslm.core.generate import generate
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import END_OF_TEXT, byte_level_tokenizer
from tisslm.kb import Hit
from tisslm.kb.context import with_context

TOKENIZER = byte_level_tokenizer()
EOT = TOKENIZER.token_to_id(END_OF_TEXT)
MAX_PROMPT_TOKENS = 400  # the context budget of every grounded request here (the model's context is 4096)
PLANTED = {"path": "tariffs.py", "name": "tariffs.customs_duty", "start_line": 1, "end_line": 3}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def kb_dir(tmp_path_factory):
    return build_tiny_kb(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def server(model_dir, kb_dir, tmp_path_factory):
    limits = ["--max-prompt-tokens", str(MAX_PROMPT_TOKENS), "--max-tokens", "64"]
    process = ServerProcess(model_dir, "--kb", str(kb_dir), *limits, workdir=tmp_path_factory.mktemp("srv"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def reference(model_dir) -> TissLM:
    return TissLM.from_pretrained(model_dir).eval()


def post(server: ServerProcess, path: str, body) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def retrieved(server: ServerProcess, query: str, k: int, mode: str = "fused") -> list[Hit]:
    response = post(server, "/v1/retrieve", {"query": query, "k": k, "mode": mode})
    assert response.status_code == 200, response.text
    return [Hit(**hit) for hit in response.json()["data"]]


def cited(hits: list[Hit]) -> list[dict]:
    """Hits as an answer's `sources` cite them: without their text."""
    return [{key: value for key, value in hit.to_json().items() if key != "text"} for hit in hits]


def greedy(model: TissLM, text: str, max_tokens: int) -> str:
    """What `generate` continues `text` with at temperature 0, with the server's stop token and vocabulary."""
    ids = generate(model, [TOKENIZER.encode(text).ids], max_tokens, temperature=0, stop_tokens=[EOT], vocab_limit=257)
    return TOKENIZER.decode(ids[0])


def events(server: ServerProcess, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}{path}", json=body | {"stream": True}, timeout=60) as response:
        assert response.status_code == 200
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_retrieve_finds_the_planted_function_first(server):
    for mode in ("fused", "bm25", "dense"):
        body = post(server, "/v1/retrieve", {"query": KB_QUERY, "k": 3, "mode": mode}).json()
        assert body["object"] == "list" and 1 <= len(body["data"]) <= 3, (mode, body)
        first = body["data"][0]
        assert {key: first[key] for key in PLANTED} == PLANTED, mode
        assert "Duty owed on imported goods" in first["text"]
        scores = [hit["score"] for hit in body["data"]]
        assert scores == sorted(scores, reverse=True), mode
    default = post(server, "/v1/retrieve", {"query": KB_QUERY}).json()["data"]  # k 5, fused
    assert len(default) == 5 and default[0]["path"] == "tariffs.py"

    info = httpx.get(f"{server.url}/v1/kb", timeout=30).json()
    assert info["object"] == "knowledge_base"
    assert info["documents"] == len(KB_CORPUS) and info["chunks"] >= len(KB_CORPUS)
    assert info["embedding_model"].startswith("wordllama") and "directory" not in info  # no server path leaks


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/retrieve", {}, "query"),
        ("/v1/retrieve", {"query": ""}, "query"),
        ("/v1/retrieve", {"query": "   "}, "query"),  # the knowledge base refuses a query of blanks
        ("/v1/retrieve", {"query": "x", "k": 0}, "k"),
        ("/v1/retrieve", {"query": "x", "k": 51}, "k"),
        ("/v1/retrieve", {"query": "x", "k": "3"}, "k"),
        ("/v1/retrieve", {"query": "x", "mode": "semantic"}, "mode"),
        ("/v1/retrieve", {"query": "x", "top": 3}, "top"),
        ("/v1/completions", {"prompt": "x", "retrieve": {"k": 0}}, "retrieve"),
        ("/v1/completions", {"prompt": "x", "retrieve": {"mode": "exact"}}, "retrieve"),
        ("/v1/completions", {"prompt": "x", "retrieve": True}, "retrieve"),
        ("/v1/completions", {"prompt": ["a", "b"], "retrieve": {}}, "retrieve"),  # one prompt per grounded request
        ("/v1/completions", {"prompt": "x", "retrieve": {"query": " "}}, "retrieve"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "retrieve": {"k": 99}}, "retrieve"),
    ],
)
def test_bad_retrieval_requests_get_openai_errors(server, path, body, param):
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_value" and error["message"]


def test_grounded_completion_cites_its_sources_and_reads_the_context(server, reference):
    prompt = "def total_duty(items):\n"
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0}
    answer = post(server, "/v1/completions", body | {"retrieve": {"query": KB_QUERY, "k": 2}}).json()

    # The prompt the model read: the two best chunks, then the prompt, as `with_context` assembles them.
    grounded = with_context(prompt, retrieved(server, KB_QUERY, 2), TOKENIZER, MAX_PROMPT_TOKENS)
    assert len(grounded.sources) == 2 and not grounded.truncated
    assert "Duty owed on imported goods" in grounded.text and grounded.text.endswith(prompt)
    assert answer["sources"] == cited(grounded.sources) and answer["sources"][0] | PLANTED == answer["sources"][0]
    assert answer["context_truncated"] is False
    assert answer["usage"]["prompt_tokens"] == len(TOKENIZER.encode(grounded.text).ids)
    assert answer["usage"]["prompt_tokens"] > len(TOKENIZER.encode(prompt).ids) + 100
    assert answer["choices"][0]["text"] == greedy(reference, grounded.text, 24)

    plain = post(server, "/v1/completions", body).json()  # no `retrieve`: OpenAI's request, OpenAI's answer
    assert "sources" not in plain and "context_truncated" not in plain
    assert plain["usage"]["prompt_tokens"] == len(TOKENIZER.encode(prompt).ids)
    assert plain["choices"][0]["text"] == greedy(reference, prompt, 24)


def test_context_is_cut_to_the_budget_and_says_so(server):
    prompt = "total = customs_duty(price, 0.2)\n"
    answer = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "retrieve": {"k": 8}}).json()
    hits = retrieved(server, prompt, 8)  # by default the query is the prompt
    grounded = with_context(prompt, hits, TOKENIZER, MAX_PROMPT_TOKENS)
    assert grounded.truncated and 1 <= len(grounded.sources) < len(hits)
    assert answer["context_truncated"] is True and answer["sources"] == cited(grounded.sources)
    assert answer["usage"]["prompt_tokens"] == len(TOKENIZER.encode(grounded.text).ids) <= MAX_PROMPT_TOKENS


def test_streamed_grounded_completion_sends_the_sources_first(server):
    body = {"prompt": "def total_duty(items):\n", "max_tokens": 24, "temperature": 0, "retrieve": {"query": KB_QUERY}}
    whole = post(server, "/v1/completions", body).json()
    chunks = events(server, "/v1/completions", body | {"stream_options": {"include_usage": True}})
    first, rest = chunks[0], chunks[1:]
    assert first["sources"] == whole["sources"] and first["sources"][0]["path"] == "tariffs.py"
    assert first["context_truncated"] is whole["context_truncated"]
    assert [(c["index"], c["text"], c["finish_reason"]) for c in first["choices"]] == [(0, "", None)]
    assert all("sources" not in c and "context_truncated" not in c for c in rest)
    assert "".join(c["choices"][0]["text"] for c in rest if c["choices"]) == whole["choices"][0]["text"]
    assert rest[-1]["usage"] == whole["usage"]


def test_grounded_chat_with_the_openai_client(server, reference):
    client = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "How much customs duty is owed on imported goods?"}]
    reply = client.chat.completions.create(
        model="tisslm", messages=messages, max_tokens=16, temperature=0, extra_body={"retrieve": {"k": 1}}
    )
    # The query is the last user message; the chunks go before the whole rendered conversation.
    hits = retrieved(server, messages[0]["content"], 1)
    grounded = with_context(ChatTemplate().render(messages), hits, TOKENIZER, MAX_PROMPT_TOKENS)
    assert reply.model_extra["sources"] == cited(grounded.sources) == [cited(hits)[0]]
    assert reply.model_extra["sources"][0]["path"] == "tariffs.py" and reply.model_extra["context_truncated"] is False
    assert reply.usage.prompt_tokens == len(TOKENIZER.encode(grounded.text).ids)

    stream = client.chat.completions.create(
        model="tisslm", messages=messages, max_tokens=16, temperature=0, stream=True, extra_body={"retrieve": {"k": 1}}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["sources"] == reply.model_extra["sources"]
    assert all("sources" not in (c.model_extra or {}) for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content


def one_line_error(args: list[str], fragment: str, cwd) -> None:
    command = [sys.executable, "-m", "tisslm.cli", "serve", "--port", "0", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert fragment in result.stderr and "serving" not in result.stdout  # refused before it listened


def test_without_a_knowledge_base_retrieval_is_refused(model_dir, tmp_path):
    one_line_error(["--model", str(model_dir), "--kb", str(tmp_path / "nowhere")], "no knowledge base here", tmp_path)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "index.sqlite").write_bytes(b"not a database at all" * 100)
    one_line_error(["--model", str(model_dir), "--kb", str(tmp_path / "junk")], "index.sqlite", tmp_path)

    server = ServerProcess(model_dir, workdir=tmp_path)
    chat = {"messages": [{"role": "user", "content": "x"}], "retrieve": {}}
    try:
        for response, status in [
            (post(server, "/v1/retrieve", {"query": KB_QUERY}), 404),
            (httpx.get(f"{server.url}/v1/kb", timeout=30), 404),
            (post(server, "/v1/completions", {"prompt": "x", "retrieve": {}}), 400),
            (post(server, "/v1/chat/completions", chat), 400),
        ]:
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert error["code"] == "no_knowledge_base" and "--kb" in error["message"]
            assert error["param"] == (None if status == 404 else "retrieve")
        assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        server.stop()

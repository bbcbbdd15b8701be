"""API keys (`tisslm serve --api-key`, `--api-keys-file`) over HTTP against a real server: /v1/ needs a key."""

from __future__ import annotations

import hashlib

import httpx
import openai
import pytest
from openai import OpenAI
from playwright.sync_api import expect
from serving import ServerProcess, save_tiny_model
from test_web import browser_page

KEY = "sk-tisslm-first-0123456789"
FILE_KEY = "sk-tisslm-from-file-abcdef"
CALLS = [
    ("POST", "/v1/completions", {"prompt": "def f(x):", "max_tokens": 4}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    ("GET", "/v1/models", None),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    keys_file = tmp / "keys.txt"
    keys_file.write_text(f"# the team's key\n\n{FILE_KEY}\n")
    process = ServerProcess(
        save_tiny_model(tmp / "model"),
        *("--api-key", KEY, "--api-keys-file", str(keys_file), "--audit-log", str(tmp / "audit.jsonl")),
        workdir=tmp,
    )
    yield process
    process.stop()


def call(server, method, path, body, key=None, scheme="Bearer"):
    headers = {"Authorization": f"{scheme} {key}"} if key is not None else {}
    return httpx.request(method, server.url + path, json=body, headers=headers, timeout=60)


@pytest.mark.parametrize(("method", "path", "body"), CALLS)
def test_v1_routes_need_a_valid_key(server, method, path, body):
    for key, scheme in [(None, "Bearer"), ("sk-wrong", "Bearer"), (KEY + "x", "Bearer"), (KEY, "Basic")]:
        refused = call(server, method, path, body, key, scheme)
        assert refused.status_code == 401, (key, scheme)
        assert refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["error"]["code"] == "invalid_api_key"
    assert call(server, method, path, body, KEY).status_code == 200
    assert call(server, method, path, body, FILE_KEY).status_code == 200


def test_the_openai_client_with_the_key(server):
    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert client.models.list().data[0].id
    assert client.completions.create(model=None, prompt="a", max_tokens=3).usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0).models.list()


def test_health_metrics_page_and_docs_stay_open(server):
    for path in ("/health", "/metrics", "/", "/openapi.json", "/docs"):
        assert httpx.get(server.url + path, timeout=10).status_code == 200, path
    document = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "One of the server's API keys",
    }
    assert document["paths"]["/v1/completions"]["post"]["security"] == [{"bearer": []}]
    assert "401" in document["paths"]["/v1/models"]["get"]["responses"]
    assert "security" not in document["paths"]["/health"]["get"]


def test_the_page_sends_the_key_it_is_given(server):
    with browser_page(server.url) as page:
        expect(page.locator("#model-name")).to_contain_text("needs an API key")
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        expect(page.locator("#model-name")).to_contain_text("tisslm")
        page.fill("#prompt", "def add(a, b):\n")
        page.fill("#max-tokens", "8")
        page.click("#generate")
        expect(page.locator("#status")).to_contain_text("done")
        assert page.evaluate("sessionStorage.getItem('tisslm-api-key')") == KEY


def test_keys_never_reach_the_log_or_the_audit_file(server):
    call(server, "GET", "/v1/models", None, KEY)
    call(server, "GET", "/v1/models", None, "sk-wrong")
    audit = (server.log_path.parent / "audit.jsonl").read_text()
    for text in (server.log(), audit):
        assert KEY not in text and FILE_KEY not in text and "sk-wrong" not in text
    assert f'"key_id":"{hashlib.sha256(KEY.encode()).hexdigest()[:8]}"' in audit
    assert '"status":401' in audit
    assert "API key" in server.log() and "warning" not in server.log()


def test_listening_beyond_loopback_without_a_key_warns(tmp_path):
    process = ServerProcess(save_tiny_model(tmp_path / "model"), "--host", "0.0.0.0", workdir=tmp_path)
    try:
        assert "warning: listening on 0.0.0.0" in process.log()
        assert httpx.get(f"{process.url}/v1/models", timeout=10).status_code == 200  # no key: open
    finally:
        process.stop()

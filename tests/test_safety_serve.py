"""The content filter and the watermark in a real `tisslm serve`, over HTTP.

The models are `save_chain_model`s: whatever the sampling, they write a known text, so that the
filter meets exactly what a test plants: "history -c;bq@xz.uk" (a shell command the default
policy flags and an email it redacts) on every line of one, "fuck" on every line of the other.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from serving import ServerProcess, save_chain_model, save_tiny_model, stream_events

from tisslm.core.config import WatermarkParams
from tisslm.core.tokenizer import byte_level_tokenizer
from tisslm.safety.audit import sha256_text, verify
from tisslm.safety.watermark import Watermark

LINE = "history -c;bq@xz.uk"
SENT_LINE = "history -c;<EMAIL>"


@pytest.fixture(scope="module")
def flagging_server(tmp_path_factory):
    """The default policy (toxicity block, pii and secrets redact, shell flag), with an audit log."""
    workdir = tmp_path_factory.mktemp("filtered")
    model = save_chain_model(workdir / "model", f"\n{LINE}\n")
    server = ServerProcess(model, "--audit-log", "audit.jsonl", workdir=workdir, filtered=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def abusive_server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("abusive")
    model = save_chain_model(workdir / "model", "\nfuck\n")
    server = ServerProcess(model, workdir=workdir, filtered=True)
    yield server
    server.stop()


def complete(server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", json={"max_tokens": 60, "temperature": 0, **body}, timeout=60)


def test_outputs_are_redacted_and_flagged(flagging_server):
    reply = complete(flagging_server, prompt="run\n")
    assert reply.status_code == 200
    choice = reply.json()["choices"][0]
    assert choice["text"].startswith(f"{SENT_LINE}\n{SENT_LINE}\n")
    assert "bq@xz" not in choice["text"]
    assert choice["finish_reason"] == "length"
    results = {(r["category"], r["action"]) for r in choice["content_filter_results"]}
    assert results == {("pii", "redact"), ("shell", "flag")}


def test_streamed_outputs_are_redacted_line_by_line(flagging_server):
    body = {"prompt": "run\n", "max_tokens": 60, "temperature": 0, "stream": True}
    events = stream_events(flagging_server.url, "/v1/completions", body)
    texts = [e["choices"][0]["text"] for e in events if e.get("choices")]
    assert "".join(texts) == complete(flagging_server, prompt="run\n").json()["choices"][0]["text"]
    assert all("bq@" not in text for text in texts)
    released = [text for text in texts if text]
    assert all(text.endswith("\n") for text in released[:-1])  # whole lines, checked before they leave
    assert events[-1]["choices"][0]["content_filter_results"]


def test_chat_is_filtered_the_same_way(flagging_server):
    client = openai.OpenAI(base_url=f"{flagging_server.url}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="tisslm", messages=[{"role": "user", "content": "hi"}], max_tokens=45, temperature=0
    )
    assert reply.choices[0].message.content.startswith(f"{SENT_LINE}\n")
    assert "bq@xz" not in reply.choices[0].message.content
    stream = client.chat.completions.create(
        model="tisslm", messages=[{"role": "user", "content": "hi"}], max_tokens=45, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == reply.choices[0].message.content


def test_a_blocked_output_ends_before_the_block_and_nothing_blocked_is_streamed(abusive_server):
    reply = complete(abusive_server, prompt="say\n")
    choice = reply.json()["choices"][0]
    assert choice["text"] == "" and choice["finish_reason"] == "content_filter"
    assert {(r["category"], r["action"]) for r in choice["content_filter_results"]} == {("toxicity", "block")}
    body = {"prompt": "say\n", "max_tokens": 60, "temperature": 0, "stream": True}
    events = stream_events(abusive_server.url, "/v1/completions", body)
    assert "fuck" not in json.dumps(events)
    assert events[-1]["choices"][0]["finish_reason"] == "content_filter"
    usage = reply.json()["usage"]
    assert usage["completion_tokens"] < 60  # the generation stopped when the filter blocked it


def test_blocked_chat_stream_ends_with_content_filter(abusive_server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30, "temperature": 0, "stream": True}
    events = stream_events(abusive_server.url, "/v1/chat/completions", body)
    assert "fuck" not in json.dumps(events)
    reasons = [e["choices"][0]["finish_reason"] for e in events if e.get("choices")]
    assert reasons[-1] == "content_filter"


def test_prompts_are_refused_redacted_or_flagged(flagging_server):
    refused = complete(flagging_server, prompt="you are a fucking idiot\n")
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "content_filter"
    assert "toxicity" in refused.json()["error"]["message"]
    redacted = complete(flagging_server, prompt="mail bob.smith@corp-mail.com\n", echo=True, max_tokens=1)
    assert redacted.status_code == 200
    assert redacted.json()["choices"][0]["text"].startswith("mail <EMAIL>\n")  # what the model read
    assert redacted.json()["prompt_filter_results"] == [{"category": "pii", "action": "redact", "count": 1}]
    flagged = complete(flagging_server, prompt="sudo rm -rf / # no\n", max_tokens=1)
    assert flagged.json()["prompt_filter_results"] == [{"category": "shell", "action": "flag", "count": 1}]
    chat = httpx.post(
        f"{flagging_server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "go to hell, you stupid moron"}]},
        timeout=60,
    )
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"


def test_logprobs_never_carry_redacted_tokens(flagging_server):
    reply = complete(flagging_server, prompt="run\n", logprobs=1, max_tokens=40)
    logprobs = reply.json()["choices"][0]["logprobs"]
    tokens = "".join(logprobs["tokens"])
    assert "history" in tokens and "@" not in tokens and "bq" not in tokens
    assert all("@" not in "".join(top) for top in logprobs["top_logprobs"] if top)


def audited(server, prompt: str, send) -> dict:
    """The audit record of the request `send()` makes with `prompt`, waited for: the server appends
    a record after the response has gone out, so the client may read the log before it is written
    (and an earlier request may have had the same prompt)."""
    path, digest = server.log_path.parent / "audit.jsonl", sha256_text(prompt)

    def records() -> list[dict]:
        return [r for r in map(json.loads, path.read_text().splitlines()) if r["prompt_sha256"] == digest]

    before = len(records())
    send()
    deadline = time.monotonic() + 10
    while len(found := records()) == before:
        assert time.monotonic() < deadline, f"no new audit record of {prompt!r} after 10 s"
        time.sleep(0.05)
    return found[-1]


def test_the_audit_log_records_the_filter_decisions(flagging_server):
    prompt = "mail bob.smith@corp-mail.com\n"
    last = audited(flagging_server, prompt, lambda: complete(flagging_server, prompt=prompt, max_tokens=20))
    assert {"on": "prompt", "category": "pii", "action": "redact", "count": 1} in last["decisions"]
    assert {"on": "output", "choice": 0, "category": "pii", "action": "redact", "count": 1} in last["decisions"]
    abuse = "you are a fucking idiot\n"
    refused = audited(flagging_server, abuse, lambda: complete(flagging_server, prompt=abuse))
    assert refused["status"] == 400
    assert refused["decisions"] == [{"on": "prompt", "category": "toxicity", "action": "block", "count": 1}]
    assert verify(flagging_server.log_path.parent / "audit.jsonl").ok


def test_the_served_watermark_is_detected_and_its_key_never_printed(tmp_path):
    key = "served-watermark-key-7f3a"
    model = save_tiny_model(tmp_path / "model")
    server = ServerProcess(
        model, "--watermark", "--max-tokens", "400", workdir=tmp_path, env={"TISSLM_WATERMARK_KEY": key}
    )
    try:
        # Bytes that are no UTF-8 come back as U+FFFD and lose their tokens: 400 leave enough.
        body = {"prompt": "def ", "max_tokens": 400, "temperature": 1.0, "seed": 3, "ignore_eos": True}
        marked = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    finally:
        server.stop()
    plain_server = ServerProcess(model, "--max-tokens", "400", workdir=tmp_path, env={"TISSLM_WATERMARK_KEY": key})
    try:
        plain = httpx.post(f"{plain_server.url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    finally:
        plain_server.stop()
    tokenizer = byte_level_tokenizer()
    detector = Watermark(key, WatermarkParams(), tokenizer.get_vocab_size())
    assert detector.detect(tokenizer.encode(marked).ids).z >= 4
    assert detector.detect(tokenizer.encode(plain).ids).z < 4
    assert key not in server.log() and key not in plain_server.log()

"""Logprobs, echo and entropies, as OpenAI defines them, checked against the model's own logits.

The engine in-process first (per-request logits processors, the scores it reports), then a real
`tisslm serve` process driven over HTTP and by the openai client: every score it answers is set
against log_softmax of `TissLM`'s logits for the same tokens, computed here in one teacher-forced
forward pass (the causal model's logits at a position are those of the prompt and the tokens so far).
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import time

import httpx
import pytest
import test_serve
import torch
from conftest import make_model
from openai import OpenAI
from serving import SERVE_MODEL, ServerProcess, stream_events

from tisslm.core.chat import ChatTemplate
from tisslm.core.generate import generate
from tisslm.core.model import TissLM
from tisslm.core.sampling import SamplingParams
from tisslm.core.tokenizer import END_OF_TEXT, byte_level_tokenizer
from tisslm.serve.batching import Batcher, Finished, PromptLogprobs, Token
from tisslm.serve.text import TextStream, Vocabulary

TOKENIZER = byte_level_tokenizer()
VOCAB = TOKENIZER.get_vocab_size()
EOT = TOKENIZER.token_to_id(END_OF_TEXT)
NAMES = Vocabulary(TOKENIZER).names
TOL = 1e-4


def scores(model: TissLM, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits (within the tokenizer's vocabulary) at every position of ids: (T, VOCAB)."""
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0, :, :VOCAB].float().log_softmax(dim=-1)


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    return -(logprobs.exp() * logprobs).sum(dim=-1)


def greedy(model: TissLM, prompt: list[int], max_tokens: int) -> list[int]:
    return generate(model, [prompt], max_tokens, temperature=0, stop_tokens=[EOT], vocab_limit=VOCAB)[0]


# ---- the engine, in-process ----


def events_of(engine: Batcher, prompt: list[int], params: SamplingParams, **options) -> queue.Queue:
    events: queue.Queue = queue.Queue()
    engine.submit(prompt, params, events.put, **options)
    return events


def drain(events: queue.Queue) -> list:
    out = [events.get(timeout=60)]
    while not isinstance(out[-1], Finished):
        out.append(events.get(timeout=60))
    return out


def test_a_logits_processor_changes_only_its_own_row_at_every_step_prefill_included():
    model = make_model(**SERVE_MODEL)
    forced, seen = 42, []

    def force(logits: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        assert logits.shape == (1, SERVE_MODEL["vocab_size"]) and previous.shape == (1,)
        seen.append(previous.item())
        only = torch.full_like(logits, float("-inf"))
        only[:, forced] = 0.0
        return only

    greedy_params = SamplingParams(max_new_tokens=6, temperature=0)
    engine = Batcher(model, max_batch=2, vocab_limit=VOCAB)  # both requests wait, then share every step
    watermarked = events_of(engine, [5, 17, 3], greedy_params, logits_processor=force, logprobs=0)
    plain = events_of(engine, [60, 61, 62], greedy_params)
    engine.start()
    try:
        marked, other = drain(watermarked), drain(plain)
    finally:
        engine.stop()
    tokens = [e.id for e in marked if isinstance(e, Token)]
    assert tokens == [forced] * 6 and seen == [3] + [forced] * 5  # the prefill's sample went through it too
    assert [e.id for e in other if isinstance(e, Token)] == greedy(model, [60, 61, 62], 6)  # untouched row
    steps = engine.metrics.batch_size.collect()[0].samples
    assert next(s.value for s in steps if s.name.endswith("_sum")) == 2 * 5  # five decode steps of both rows
    reference = scores(model, [5, 17, 3, *tokens])[2:-1, forced]  # the model's, not the processor's, distribution
    reported = torch.tensor([e.logprob.logprob for e in marked if isinstance(e, Token)])
    assert torch.allclose(reported, reference, atol=TOL) and (reported < -0.1).all()


def test_the_engine_scores_a_prompt_without_generating():
    model = make_model(**SERVE_MODEL)
    engine = Batcher(model, max_batch=1, vocab_limit=VOCAB).start()
    prompt = [5, 17, 3, 44, 9]
    try:
        events = drain(events_of(engine, prompt, SamplingParams(max_new_tokens=0), logprobs=2, prompt_logprobs=True))
        unscored = drain(events_of(engine, prompt, SamplingParams(max_new_tokens=0), logprobs=2))
    finally:
        engine.stop()
    (scored, done) = events
    assert isinstance(scored, PromptLogprobs) and isinstance(done, Finished)
    assert (done.reason, done.completion_tokens, engine.active_count) == ("length", 0, 0)
    reference = scores(model, prompt)[:-1]
    logprobs = torch.tensor([lp.logprob for lp in scored.logprobs])
    assert torch.allclose(logprobs, reference.gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1), atol=TOL)
    assert torch.allclose(torch.tensor([lp.entropy for lp in scored.logprobs]), entropy(reference), atol=TOL)
    best = reference.topk(2)
    assert [[t for t, _ in lp.top] for lp in scored.logprobs] == best.indices.tolist()
    assert [type(e) for e in unscored] == [Finished]  # without prompt_logprobs, max_new_tokens 0 runs nothing


def test_tokens_travel_with_the_text_they_settle():
    stream = TextStream(TOKENIZER, ["\n<|user|>"])
    released = []
    for token in TOKENIZER.encode("a😀b\n<|user|> more").ids:
        stream.add(token)
        released.append(stream.released_tokens)
        if stream.stopped:
            break
    # a: 1; the emoji's four bytes go together once it is whole; b; "\n" could begin the stop string;
    # at the stop string, the tokens whose text begins before it.
    assert released == [1, 1, 1, 1, 5, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6]
    assert stream.ids[: stream.released_tokens] == TOKENIZER.encode("a😀b").ids


# ---- a real server ----


model_dir, reference = test_serve.model_dir, test_serve.reference  # the serving tests' tiny model, shared


@pytest.fixture(scope="module")
def audit_log(tmp_path_factory):
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def server(model_dir, audit_log, tmp_path_factory):
    process = ServerProcess(model_dir, "--audit-log", str(audit_log), workdir=tmp_path_factory.mktemp("srv"))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)


def post(server, path: str, body: dict) -> dict:
    response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_greedy_completion_logprobs_are_the_models(server, reference):
    prompt = TOKENIZER.encode("def add(a, b):").ids
    body = {"prompt": "def add(a, b):", "max_tokens": 12, "temperature": 0, "logprobs": 5}
    (choice,) = post(server, "/v1/completions", body)["choices"]
    ids = greedy(reference, prompt, 12)
    logprobs = choice["logprobs"]
    assert choice["text"] == TOKENIZER.decode(ids) and logprobs["tokens"] == [NAMES[t] for t in ids]
    expected = scores(reference, prompt + ids)[len(prompt) - 1 : -1]  # (N, V): the step of each token
    chosen = expected.gather(1, torch.tensor(ids)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(logprobs["token_logprobs"]), chosen, atol=TOL)
    assert torch.allclose(torch.tensor(logprobs["entropies"]), entropy(expected), atol=TOL)
    for token, top, row in zip(ids, logprobs["top_logprobs"], expected, strict=True):
        assert len(top) == 5 and next(iter(top)) == NAMES[token]  # greedy: the chosen token is the top-1
        assert list(top.values()) == sorted(top.values(), reverse=True)
        best = row.topk(5)
        assert list(top) == [NAMES[t] for t in best.indices.tolist()]
        assert torch.allclose(torch.tensor(list(top.values())), best.values, atol=TOL)
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])


def test_echo_with_no_tokens_scores_the_prompt(server, reference):
    texts = ["def add(a, b):\n    return a + b\n", "héllo €"]
    body = {"prompt": texts, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    answer = post(server, "/v1/completions", body)
    assert answer["usage"]["completion_tokens"] == 0
    for text, choice in zip(texts, answer["choices"], strict=True):
        ids, logprobs = TOKENIZER.encode(text).ids, choice["logprobs"]
        assert (choice["text"], choice["finish_reason"]) == (text, "length")
        assert logprobs["tokens"] == [NAMES[t] for t in ids]
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert logprobs["entropies"][0] is None
        expected = scores(reference, ids)[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
        assert math.isclose(sum(logprobs["token_logprobs"][1:]), expected.sum().item(), abs_tol=TOL)
        assert all(1 <= len(top) <= 2 for top in logprobs["top_logprobs"][1:])  # the best, and the token if not it
    offsets = answer["choices"][1]["logprobs"]["text_offset"]
    assert offsets == [0, 1, 1, 2, 3, 4, 5, 6, 6, 6]  # h é(2 bytes) l l o ␣ €(3 bytes): where each character begins


def test_echo_then_generation_as_lm_evaluation_harness_asks(server, reference):
    text = "x = 1\ny ="
    prompt = TOKENIZER.encode(text).ids
    body = {"prompt": text, "max_tokens": 3, "echo": True, "logprobs": 1, "temperature": 0}
    (choice,) = post(server, "/v1/completions", body)["choices"]
    ids = greedy(reference, prompt, 3)
    assert choice["text"] == text + TOKENIZER.decode(ids)
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [NAMES[t] for t in prompt + ids]
    assert logprobs["text_offset"][: len(prompt) + 1] == list(range(len(prompt) + 1))
    expected = scores(reference, prompt + ids)[:-1].gather(1, torch.tensor(prompt[1:] + ids)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(logprobs["token_logprobs"][1:]), expected, atol=TOL)
    unscored = post(server, "/v1/completions", body | {"logprobs": None})["choices"][0]
    assert (unscored["text"], unscored["logprobs"]) == (choice["text"], None)  # echo alone: the text, no scores


def test_token_id_prompts_are_read_as_given(server, reference):
    """OpenAI's completions take token ids, one list or a list of lists (lm-evaluation-harness's
    tokenized requests): the model reads those ids, and echo scores exactly them."""
    texts = ["def add(a, b):\n    return a + b\n", "x = [1, 2]"]
    prompts = [TOKENIZER.encode(text).ids for text in texts]
    body = {"prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    answer = post(server, "/v1/completions", body)
    assert answer["usage"]["prompt_tokens"] == sum(map(len, prompts))
    for text, ids, choice in zip(texts, prompts, answer["choices"], strict=True):
        logprobs = choice["logprobs"]
        assert choice["text"] == text and logprobs["tokens"] == [NAMES[t] for t in ids]
        expected = scores(reference, ids)[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(logprobs["token_logprobs"][1:]), expected, atol=TOL)
    (one,) = post(server, "/v1/completions", {"prompt": prompts[1], "max_tokens": 6, "temperature": 0})["choices"]
    (as_text,) = post(server, "/v1/completions", {"prompt": texts[1], "max_tokens": 6, "temperature": 0})["choices"]
    assert one["text"] == as_text["text"] == TOKENIZER.decode(greedy(reference, prompts[1], 6))


@pytest.mark.parametrize(
    ("prompt", "code"),
    [([VOCAB], "invalid_value"), ([[1, 2], [VOCAB + 5]], "invalid_value"), ([1, "a"], "invalid_value"),
     ([], "invalid_value"), ([[]], "invalid_value"), ([-1], "invalid_value"), ([1] * 500, "context_length_exceeded")],
)  # fmt: skip
def test_bad_token_id_prompts_get_a_400_naming_the_prompt(server, prompt, code):
    response = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("prompt", code), error


def test_chat_logprobs_and_top_logprobs(server, reference):
    messages = [{"role": "user", "content": "Say hi."}]
    body = {"messages": messages, "max_tokens": 10, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    (choice,) = post(server, "/v1/chat/completions", body)["choices"]
    prompt = ChatTemplate().prompt_ids(TOKENIZER, messages)
    ids = greedy(reference, prompt, 10)
    content = choice["logprobs"]["content"]
    text = TOKENIZER.decode(ids)
    assert choice["message"]["content"] == text
    expected = scores(reference, prompt + ids)[len(prompt) - 1 : -1]
    for token, item, row in zip(ids, content, expected, strict=True):
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs", "entropy"}
        assert item["token"] == NAMES[token] and bytes(item["bytes"]) == Vocabulary(TOKENIZER).bytes[token]
        assert math.isclose(item["logprob"], row[token].item(), abs_tol=TOL)
        assert math.isclose(item["entropy"], entropy(row).item(), abs_tol=TOL)
        best = row.topk(3)
        assert [t["token"] for t in item["top_logprobs"]] == [NAMES[t] for t in best.indices.tolist()]
        assert item["top_logprobs"][0]["token"] == item["token"]  # greedy
        assert [t["logprob"] for t in item["top_logprobs"]] == sorted(
            (t["logprob"] for t in item["top_logprobs"]), reverse=True
        )
    plain = post(server, "/v1/chat/completions", body | {"top_logprobs": None})["choices"][0]["logprobs"]["content"]
    assert [item["top_logprobs"] for item in plain] == [[]] * len(ids)
    assert (
        post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})["choices"][0]["logprobs"] is None
    )


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": ["def f(x):", "import"], "max_tokens": 24, "seed": 4, "logprobs": 2, "echo": True}),
        ("/v1/completions", {"prompt": "a = [", "max_tokens": 24, "seed": 5, "logprobs": 0, "stop": ["]"]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 24, "seed": 6,
                                  "logprobs": True, "top_logprobs": 2}),
    ],
)  # fmt: skip
def test_streamed_logprobs_add_up_to_the_whole_answers(server, path, body):
    whole = post(server, path, body)["choices"]
    chunks = stream_events(server.url, path, body | {"stream": True})
    for index, choice in enumerate(whole):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        scored = [c["logprobs"] for c in mine if c["logprobs"] is not None]
        if path == "/v1/completions":
            assert "".join(c["text"] for c in mine) == choice["text"]
            for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset", "entropies"):
                assert [x for s in scored for x in s[field]] == choice["logprobs"][field], field
        else:
            assert "".join(c["delta"].get("content", "") for c in mine) == choice["message"]["content"]
            assert [x for s in scored for x in s["content"]] == choice["logprobs"]["content"]
        assert len(scored) > 1  # the scores came in pieces, with their text


def test_a_sampled_token_outside_the_top_is_still_shown(server, reference):
    body = {"prompt": "q", "max_tokens": 40, "seed": 7, "temperature": 1.5, "logprobs": 1, "ignore_eos": True}
    logprobs = post(server, "/v1/completions", body)["choices"][0]["logprobs"]
    for token, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        assert top[token] == lp and len(top) == (1 if max(top.values()) == lp else 2)
    assert any(len(top) == 2 for top in logprobs["top_logprobs"])  # at temperature 1.5 some draw is not the best


def test_the_openai_client_reads_chat_and_completion_logprobs(client, reference):
    reply = client.chat.completions.create(
        model="tisslm", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=2,
    )  # fmt: skip
    content = reply.choices[0].logprobs.content
    assert content and all(len(item.top_logprobs) == 2 and item.logprob <= 0 for item in content)
    assert all(item.top_logprobs[0].token == item.token for item in content)
    assert all(item.model_extra["entropy"] > 0 for item in content)  # TissLM's extension, kept by the client
    text = "def f(x): return x"
    scored = client.completions.create(model="tisslm", prompt=text, max_tokens=0, echo=True, logprobs=0)
    ids = TOKENIZER.encode(text).ids
    expected = scores(reference, ids)[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
    assert math.isclose(sum(scored.choices[0].logprobs.token_logprobs[1:]), expected, abs_tol=TOL)


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "logprobs": -1}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "echo": "yes"}, "echo"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": False,
                                  "top_logprobs": 0}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                  "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, "logprobs"),
    ],
)  # fmt: skip
def test_invalid_logprobs_get_openai_errors_naming_the_argument(server, path, body, param):
    response = httpx.post(f"{server.url}{path}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, "invalid_value")


def test_the_audit_log_records_the_arguments_but_never_the_echoed_prompt(server, audit_log):
    secret = "the secret prompt"
    body = {"prompt": secret, "max_tokens": 2, "echo": True, "logprobs": 1, "seed": 1}
    answer = post(server, "/v1/completions", body)
    generated = answer["choices"][0]["text"].removeprefix(secret)
    prompt_sha256 = hashlib.sha256(secret.encode()).hexdigest()
    deadline = time.monotonic() + 30  # the record is written once the response has gone out
    while not (records := [line for line in audit_log.read_text().splitlines() if prompt_sha256 in line]):
        assert time.monotonic() < deadline, "no audit record of the echo request"
        time.sleep(0.05)
    record = json.loads(records[0])
    assert record["params"]["echo"] is True
    assert record["params"]["logprobs"] == 1 and "prompt" not in record["params"]
    assert record["output_sha256"] == hashlib.sha256(generated.encode()).hexdigest()  # the generation, not the echo
    assert secret not in audit_log.read_text()

"""OpenAI's request fields beyond sampling: frequency and presence penalties (applied), fields that
change nothing (accepted), and fields the server cannot honour (refused by name unless neutral)."""

from __future__ import annotations

import queue
import threading

import httpx
import pytest
import torch
from conftest import make_model
from openai import OpenAI
from serving import SERVE_MODEL, ServerProcess, save_tiny_model

from tisslm.core.model import TissLM
from tisslm.core.sampling import PenalizedSampling, apply_penalties
from tisslm.core.tokenizer import END_OF_TEXT, byte_level_tokenizer
from tisslm.serve.batching import Batcher, Finished, Token

TOKENIZER = byte_level_tokenizer()
EOT = TOKENIZER.token_to_id(END_OF_TEXT)
VOCAB = TOKENIZER.get_vocab_size()


def test_apply_penalties_is_openais_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0, float("-inf"), 0.5]])
    counts = torch.tensor([[0, 1, 3, 2, 0]], dtype=torch.int32)
    out = apply_penalties(logits, counts, frequency_penalty=0.5, presence_penalty=1.25)
    # logits[t] - count[t] * 0.5 - (count[t] > 0) * 1.25
    expected = torch.tensor([[1.0, 2.0 - 0.5 - 1.25, 3.0 - 1.5 - 1.25, float("-inf"), 0.5]])
    assert torch.equal(out, expected)
    assert torch.equal(apply_penalties(logits, counts, 0.0, 0.0), logits)  # neutral values change nothing
    negative = apply_penalties(logits, counts, -2.0, -2.0)  # negative values favour repeats
    assert negative[0, 2].item() == 3.0 + 6.0 + 2.0


def test_penalty_bounds_are_openais():
    assert PenalizedSampling(frequency_penalty=2, presence_penalty=-2).penalized
    assert not PenalizedSampling().penalized
    for bad in (2.01, -2.5):
        with pytest.raises(ValueError, match="frequency_penalty"):
            PenalizedSampling(frequency_penalty=bad)


def penalized_greedy(model: TissLM, prompt: list[int], steps: int, frequency: float, presence: float) -> list[int]:
    """The reference: full forwards, the penalty over the generated tokens, argmax below the vocabulary."""
    ids, out = list(prompt), []
    counts = torch.zeros(model.config.vocab_size, dtype=torch.int32)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]))[0, -1].float()
            logits[VOCAB:] = float("-inf")
            token = int(apply_penalties(logits, counts, frequency, presence).argmax())
            if token == EOT:
                break
            out.append(token)
            ids.append(token)
            counts[token] += 1
    return out


def collect(engine: Batcher, prompt: list[int], params) -> list[int]:
    events: queue.Queue = queue.Queue()
    engine.submit(prompt, params, events.put, stop_tokens=[EOT])
    tokens = []
    while not isinstance(event := events.get(timeout=60), Finished):
        assert isinstance(event, Token)
        tokens.append(event.id)
    return tokens


def test_the_engine_applies_penalties_per_row():
    """A penalized greedy row gets the reference's tokens while an unpenalized one shares its steps,
    and speculation (lookahead) does not bypass the penalty."""
    model = make_model(**SERVE_MODEL).eval()
    prompt = [40, 41, 42, 43, 40, 41, 42, 43, 40, 41]
    plain = penalized_greedy(model, prompt, 30, 0.0, 0.0)
    penalized = penalized_greedy(model, prompt, 30, 1.5, 0.5)
    assert plain != penalized  # the tiny model repeats itself: the penalty changes what it says
    assert len(set(penalized)) > len(set(plain))
    engine = Batcher(model, max_batch=2, vocab_limit=VOCAB, lookahead=4).start()
    try:
        greedy = {"max_new_tokens": 30, "temperature": 0}
        assert collect(engine, prompt, PenalizedSampling(**greedy, frequency_penalty=1.5, presence_penalty=0.5)) == (
            penalized
        )
        assert collect(engine, prompt, PenalizedSampling(**greedy)) == plain
        results: dict[str, list[int]] = {}
        settings = {
            "plain": PenalizedSampling(**greedy),
            "penalized": PenalizedSampling(**greedy, frequency_penalty=1.5, presence_penalty=0.5),
        }

        def run(name: str) -> None:
            results[name] = collect(engine, prompt, settings[name])

        threads = [threading.Thread(target=run, args=(name,)) for name in settings]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == {"plain": plain, "penalized": penalized}
    finally:
        engine.stop()


# ---- a real server ----


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    process = ServerProcess(model_dir, "--max-batch", "4", workdir=tmp_path_factory.mktemp("srv"))
    yield process
    process.stop()


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{route}", json=body, timeout=60)


def test_served_penalties_match_the_reference(server, model_dir):
    reference = TissLM.from_pretrained(model_dir).eval()
    prompt = "abcabcabc"
    ids = TOKENIZER.encode(prompt).ids
    client = OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
    # What many clients send: the neutral values, which were refused with 400 before.
    neutral = client.completions.create(
        model="tisslm", prompt=prompt, max_tokens=24, temperature=0, frequency_penalty=0, presence_penalty=0
    )
    assert neutral.choices[0].text == TOKENIZER.decode(penalized_greedy(reference, ids, 24, 0.0, 0.0))
    penalized = client.completions.create(
        model="tisslm", prompt=prompt, max_tokens=24, temperature=0, frequency_penalty=1.5, presence_penalty=0.5
    )
    expected = TOKENIZER.decode(penalized_greedy(reference, ids, 24, 1.5, 0.5))
    assert penalized.choices[0].text == expected != neutral.choices[0].text
    chat = client.chat.completions.create(
        model="tisslm",
        messages=[{"role": "user", "content": "hi", "name": "ada"}],
        max_tokens=8,
        temperature=0,
        frequency_penalty=0,
        presence_penalty=0,
        user="u-1",
        metadata={"run": "x"},
        store=False,
        logit_bias={},
        response_format={"type": "text"},
        tool_choice="none",
    )
    assert chat.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "field, value, code",
    [
        ("frequency_penalty", 2.5, "invalid_value"),
        ("presence_penalty", -3, "invalid_value"),
        ("logit_bias", {"65": 10}, "unsupported_value"),
        ("response_format", {"type": "json_object"}, "unsupported_value"),
        ("tools", [{"type": "function", "function": {"name": "f"}}], "unsupported_value"),
        ("tool_choice", "required", "unsupported_value"),
        ("functions", [{"name": "f"}], "unsupported_value"),
        ("store", True, "unsupported_value"),
        ("best_of", 3, "unsupported_value"),
        ("suffix", "tail", "unsupported_value"),
        ("audio", {"voice": "x"}, "invalid_value"),  # not OpenAI's for completions: unrecognized
    ],
)
def test_unsupported_values_are_refused_by_name(server, field, value, code):
    route = "/v1/completions"
    body = {"prompt": "x", "max_tokens": 2, field: value}
    response = post(server, route, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (field, code)
    assert field in error["message"]


def test_chat_refuses_tools_and_accepts_neutral_best_of_free_fields(server):
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    response = post(server, "/v1/chat/completions", chat | {"tools": [{"type": "function"}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"
    assert "tool calling is not supported" in response.json()["error"]["message"]
    ok = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2, "best_of": 1, "suffix": "", "n": 1})
    assert ok.status_code == 200, ok.text

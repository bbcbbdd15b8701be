"""The registry's promotion gate, against a real MLflow sqlite store."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from conftest import free_port, make_model, wait_until_up

from tisslm.core.config import RegisterParams
from tisslm.core.tokenizer import byte_level_tokenizer
from tisslm.release.registry import MODEL_NAME, gate, register

TEXTS = ["def add(a, b):\n    return a + b\n", "def sub(a, b):\n    return a - b\n", "import os\nprint(os.getcwd())\n"]


def trained(model, steps: int):
    """A few optimizer steps on the texts: bits per byte falls a lot from random init."""
    model = copy.deepcopy(model).train()
    tokenizer = byte_level_tokenizer()
    batch = [torch.tensor(tokenizer.encode(t).ids) for t in TEXTS]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        for ids in batch:
            loss = model.loss(ids[None, :-1], ids[None, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def save(model, path):
    model.save_pretrained(path, tokenizer=byte_level_tokenizer())
    return path


def test_gate_promotes_only_better_models_and_the_champion_generates(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = RegisterParams(min_improvement=0.01, max_bias_shift=5.0)
    base = make_model(vocab_size=257, max_seq_len=64)
    good = trained(base, 15)
    first = register(save(good, tmp_path / "good"), TEXTS, 32, 52.0, 0.25, params)
    assert first.promoted and first.reasons == ["first registered model"]

    damaged = copy.deepcopy(good)
    with torch.no_grad():
        for p in damaged.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * p.std())
    worse = register(save(damaged, tmp_path / "damaged"), TEXTS, 32, 50.0, 0.25, params)
    assert not worse.promoted and worse.champion_version == first.challenger_version
    assert worse.challenger_bits_per_byte > worse.previous_champion_bits_per_byte
    assert "does not beat" in worse.reasons[0]

    same = register(save(good, tmp_path / "same"), TEXTS, 32, 52.0, 0.25, params)
    assert not same.promoted  # equal is not better by min_improvement

    better = trained(good, 15)
    biased = register(save(better, tmp_path / "biased"), TEXTS, 32, 90.0, 0.25, params)
    assert not biased.promoted and "more than the allowed" in biased.reasons[1]
    worse_coder = register(save(better, tmp_path / "worse_coder"), TEXTS, 32, 51.0, 0.2, params)
    assert not worse_coder.promoted and worse_coder.previous_champion_pass_at_1 == 0.25  # the champion's tag
    assert worse_coder.reasons[2] == "HumanEval pass@1 20.0% is below 25.0% (champion 25.0% less 0.0%)"
    promoted = register(save(better, tmp_path / "better"), TEXTS, 32, 51.0, 0.25, params)
    assert promoted.promoted and promoted.challenger_bits_per_byte < promoted.previous_champion_bits_per_byte

    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == promoted.challenger_version
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").tags["humaneval_pass_at_1"] == "0.25"
    assert str(client.get_model_version_by_alias(MODEL_NAME, "challenger").version) == promoted.challenger_version
    champion = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    out = champion.predict(pd.DataFrame({"prompt": ["def ", "import "]}), params={"max_new_tokens": 12})
    assert len(out) == 2 and all(isinstance(text, str) and text for text in out)
    short = champion.predict(pd.DataFrame({"prompt": ["def "]}), params={"max_new_tokens": 3})
    assert len(short[0].encode()) <= 3  # the params schema carries max_new_tokens through (byte tokens)


@pytest.mark.parametrize(
    ("challenger_bpb", "challenger_bias", "challenger_pass", "promoted"),
    [
        (1.0, 50.0, 0.3, True),
        (1.0, 50.0, 0.5, True),
        (1.0, 60.0, 0.3, False),
        (1.195, 50.0, 0.3, False),
        (0.9, 56.0, 0.3, False),
        (1.0, 50.0, 0.29, False),
        (0.5, 50.0, 0.0, False),
    ],
)
def test_gate_needs_the_gain_the_fairness_and_no_lost_pass_at_1(
    challenger_bpb, challenger_bias, challenger_pass, promoted
):
    """Champion at 1.2 bits/byte, pct_stereotype 50 and pass@1 0.3: a 1% gain is needed, at most 5
    points more bias, and no lower pass@1."""
    decided, reasons = gate(challenger_bpb, 1.2, challenger_bias, 50.0, challenger_pass, 0.3, RegisterParams())
    assert decided is promoted and len(reasons) == 3


def test_the_gate_allows_the_pass_at_1_drop_it_is_given():
    params = RegisterParams(max_pass_at_1_drop=0.05)
    assert gate(1.0, 1.2, 50.0, 50.0, 0.26, 0.3, params)[0]
    refused, reasons = gate(1.0, 1.2, 50.0, 50.0, 0.24, 0.3, params)
    assert not refused and reasons[2] == "HumanEval pass@1 24.0% is below 25.0% (champion 30.0% less 5.0%)"


def test_a_champion_registered_without_pass_at_1_counts_as_zero(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = RegisterParams(min_improvement=0.01, max_bias_shift=5.0)
    good = trained(make_model(vocab_size=257, max_seq_len=64), 15)
    first = register(save(good, tmp_path / "good"), TEXTS, 32, 50.0, 0.5, params)
    mlflow.MlflowClient().delete_model_version_tag(MODEL_NAME, first.challenger_version, "humaneval_pass_at_1")
    decision = register(save(trained(good, 15), tmp_path / "better"), TEXTS, 32, 50.0, 0.0, params)
    assert decision.promoted and decision.previous_champion_pass_at_1 == 0.0


def test_mlflow_models_serve_answers_invocations_with_the_champion(tmp_path, monkeypatch):
    """`mlflow models serve -m models:/tisslm@champion --env-manager local`, a real server on loopback:
    /invocations generates as the pyfunc does in-process, within the params schema's max_new_tokens."""
    import os
    import subprocess
    import sys

    import httpx
    import mlflow

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    good = trained(make_model(vocab_size=257, max_seq_len=64), 15)
    assert register(save(good, tmp_path / "good"), TEXTS, 32, 50.0, 0.0, RegisterParams()).promoted
    local = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    expected = local.predict(pd.DataFrame({"prompt": ["def ", "import "]}), params={"max_new_tokens": 6})
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL_NAME}@champion",
               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    log = (tmp_path / "serve.log").open("w")
    # MLflow execs `uvicorn` from PATH: the environment's bin directory must be on it, as an activated venv's is.
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/ping", server, tmp_path / "serve.log", "mlflow models serve")
        body = {"dataframe_records": [{"prompt": "def "}, {"prompt": "import "}], "params": {"max_new_tokens": 6}}
        reply = httpx.post(f"{url}/invocations", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["predictions"] == list(expected)
        short = httpx.post(f"{url}/invocations", json=body | {"params": {"max_new_tokens": 2}}, timeout=60)
        assert all(len(text.encode()) <= 2 for text in short.json()["predictions"])  # byte tokens
        wrong = httpx.post(f"{url}/invocations", json=body | {"params": {"max_new_tokens": "many"}}, timeout=60)
        assert wrong.status_code == 400
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_each_model_reads_the_val_text_through_its_own_tokenizer(tmp_path, monkeypatch):
    """A challenger with a new tokenizer is compared with the champion as the champion reads the text."""
    from tisslm.core.config import TokenizerParams
    from tisslm.core.tokenizer import train_bpe

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = RegisterParams(min_improvement=0.01, max_bias_shift=5.0)
    champion = register(save(trained(make_model(vocab_size=257, max_seq_len=64), 15), tmp_path / "bytes"), TEXTS,
                        32, 50.0, 0.0, params)  # fmt: skip
    bpe = train_bpe(TEXTS * 20, TokenizerParams(vocab_size=300), show_progress=False)
    assert bpe.encode(TEXTS[0]).ids != byte_level_tokenizer().encode(TEXTS[0]).ids
    challenger = make_model(vocab_size=300, max_seq_len=64)
    challenger.save_pretrained(tmp_path / "bpe", tokenizer=bpe)
    decision = register(tmp_path / "bpe", TEXTS, 32, 50.0, 0.0, params)
    assert decision.previous_champion_bits_per_byte == pytest.approx(champion.challenger_bits_per_byte, rel=1e-6)

"""The content filter wherever text leaves outside the server: `tisslm generate`, `tisslm chat`,
TissLang's PROMPT_AGENT, the MLflow pyfunc; and `tisslm safety scan`."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from serving import save_chain_model
from test_tisslang_security import run_script

from tisslm.agent.adapter import LocalModel
from tisslm.core.config import ContentFilterParams
from tisslm.safety.filters import ContentFilter

LINE = "history -c;bq@xz.uk"


def tisslm(*args: str, cwd, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tisslm.cli", *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def chain_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("chains")
    return save_chain_model(root / "pii", f"\n{LINE}\n"), save_chain_model(root / "abuse", "\nfuck\n")


def test_generate_prints_the_filtered_text_and_says_what_it_did(chain_models, tmp_path):
    result = tisslm("generate", "--model", str(chain_models[0]), "--prompt", "run\n", "--temperature", "0",
                    "--max-new-tokens", "25", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("run\nhistory -c;<EMAIL>\n") and "bq@" not in result.stdout
    assert "[content filter: shell flag x1, pii redact x1]" in result.stderr  # in text order


def test_terminal_chat_refuses_abuse_and_ends_blocked_replies(chain_models, tmp_path):
    result = tisslm("chat", "--model", str(chain_models[1]), "--max-new-tokens", "20", "--temperature", "0",
                    cwd=tmp_path, stdin="you stupid fucking moron\nhello\n/exit\n")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "(refused by the content filter: toxicity)" in result.stdout
    assert "[ended by the content filter]" in result.stdout
    assert "fuck" not in result.stdout.replace("you stupid fucking moron", "")


def test_prompt_agent_answers_go_through_the_filter(chain_models, tmp_path):
    engine, _ = run_script(
        'PROMPT_AGENT "mail;" INTO answer',  # ';' leads the chain model into its email
        tmp_path,
        sandbox="none",  # the script runs no command
        adapter=LocalModel(chain_models[0]),
        content_filter=ContentFilter(ContentFilterParams()),
    )
    answer = engine.variables["answer"]
    whole_lines = answer[: answer.rfind("\n")]  # the chain loops until the context is full: its last line is cut
    assert "<EMAIL>" in whole_lines and "bq@" not in whole_lines


def test_the_pyfunc_filters_its_outputs(chain_models):
    import pandas as pd

    from tisslm.release.pyfunc import TissLMPyfunc

    pyfunc = TissLMPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"model": str(chain_models[0])}))  # what MLflow passes
    [text] = pyfunc.predict(None, pd.DataFrame({"prompt": ["run\n"]}), {"max_new_tokens": 25})
    assert text.startswith("history -c;<EMAIL>\n")


def test_safety_scan_lists_findings_and_exits_by_action(tmp_path):
    risky = tmp_path / "risky.txt"
    risky.write_text("ok\ncontact: jane.doe@corp-mail.com\nsudo rm -rf /\n")
    result = tisslm("safety", "scan", str(risky), cwd=tmp_path)
    assert result.returncode == 1
    assert f"{risky}:2:10: pii EMAIL: redact: jane.doe@corp-mail.com" in result.stdout
    assert f"{risky}:3:6: shell SHELL: flag: rm -rf /" in result.stdout
    as_json = json.loads(tisslm("safety", "scan", "--json", str(risky), cwd=tmp_path).stdout)
    assert as_json["action"] == "redact" and "<EMAIL>" in as_json["text"]
    clean = tmp_path / "clean.txt"
    clean.write_text("kill -9 the child process\nmaster/slave replication\n")
    assert tisslm("safety", "scan", str(clean), cwd=tmp_path).returncode == 0
    piped = tisslm("safety", "scan", "-", cwd=tmp_path, stdin="you are a fucking idiot\n")
    assert piped.returncode == 1 and "toxicity TOXIC" in piped.stdout
    missing = tisslm("safety", "scan", str(tmp_path / "nope.txt"), cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no such file" in missing.stderr


# ---- one filter, one watermark, one params loader; a quiet, light `safety scan` (issue 24) -----------


def test_safety_scan_filters_with_the_anonymiser_settings_the_server_uses(tmp_path):
    text = tmp_path / "mail.txt"
    text.write_text("write to jane.doe@corp-mail.com\n")
    (tmp_path / "params.yaml").write_text("clean:\n  anonymize:\n    emails: false\n")
    result = tisslm("safety", "scan", "--json", str(text), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["findings"] == []  # emails are not personal data under these params
    defaults = tisslm("safety", "scan", "--json", "--params", str(tmp_path / "none.yaml"), str(text), cwd=tmp_path)
    assert defaults.returncode == 2 and "none.yaml: not found" in defaults.stderr


def test_from_params_builds_the_filter_and_the_watermark_in_one_place(monkeypatch):
    import inspect

    from tisslm.core.config import Params, with_updates
    from tisslm.safety.watermark import KEY_ENV, Watermark
    from tisslm.serve.server import serve

    params = with_updates(Params(), {"clean.anonymize.ibans": False, "safety.filters.policy.shell": "block"})
    content_filter = ContentFilter.from_params(params)
    assert content_filter.anonymize.ibans is False and content_filter.policy["shell"] == "block"

    monkeypatch.delenv(KEY_ENV, raising=False)
    assert Watermark.from_params(Params(), 257) is None  # off by default
    forced = Watermark.from_params(Params(), 257, enabled=True)
    assert isinstance(forced, Watermark) and forced.vocab_size == 257
    enabled = with_updates(Params(), {"safety.watermark.enabled": True, "safety.watermark.delta": 3.0})
    assert Watermark.from_params(enabled, 257).delta == 3.0
    assert Watermark.from_params(enabled, 257, enabled=False) is None
    same = Watermark(enabled.safety.watermark.key, enabled.safety.watermark, 257)
    assert Watermark.from_params(enabled, 257).green_list(5) == same.green_list(5)
    # The server takes the built watermark whole; it no longer rebuilds one from its parts.
    assert "watermark_key" not in inspect.signature(serve).parameters


# What `safety scan` must not load: Presidio and its models, scikit-learn and its numerics.
LIGHT = {"torch", "presidio_analyzer", "transformers", "spacy", "sklearn", "scipy", "numpy", "pandas"}
LIGHT |= {"profanity_check"}  # once the toxicity classifier's numbers are cached


@pytest.fixture
def toxicity_cache(tmp_path, monkeypatch):
    """A cache of the toxicity classifier's numbers, made here, which the CLIs started by the test use."""
    from tisslm.safety import toxicity

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    toxicity.load()
    return tmp_path / "cache" / "tisslm" / toxicity.CACHE_NAME


def test_safety_scan_stays_off_torch_and_presidio_until_a_card_number_needs_them(tmp_path, toxicity_cache):
    from test_cli import imported

    plain = tmp_path / "plain.txt"
    plain.write_text("def add(a, b):\n    return a + b\n")
    result, modules = imported("safety", "scan", str(plain), cwd=tmp_path)
    assert result.returncode == 0 and "allow (0 finding(s))" in result.stdout
    assert sorted(modules & LIGHT) == []


def test_safety_scan_of_card_numbers_and_ibans_imports_no_model_library(tmp_path, toxicity_cache):
    """Cards and IBANs are checked by python-stdnum, toxicity scored from the cached numbers: a scan
    loads neither Presidio (spaCy, transformers, torch) nor scikit-learn (issue 24)."""
    from test_cli import imported

    money = tmp_path / "money.txt"
    money.write_text("pay with 4111 1111 1111 1111 today\nIBAN DE89 3704 0044 0532 0130 00\nyou fucking idiot\n")
    result, modules = imported("safety", "scan", str(money), cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    for kind in ("pii CARD_NUMBER: redact", "pii IBAN: redact", "toxicity TOXIC (score 1.00): block"):
        assert kind in result.stdout
    assert sorted(modules & LIGHT) == []


def test_safety_scan_builds_the_toxicity_cache_once(tmp_path, monkeypatch):
    from test_cli import imported

    from tisslm.safety.toxicity import CACHE_NAME

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    abuse = tmp_path / "abuse.txt"
    abuse.write_text("you fucking idiot\n")
    first, modules = imported("safety", "scan", str(abuse), cwd=tmp_path)
    assert first.returncode == 1 and "toxicity TOXIC" in first.stdout
    assert "profanity_check" in modules and (tmp_path / "cache" / "tisslm" / CACHE_NAME).is_file()
    second, modules = imported("safety", "scan", str(abuse), cwd=tmp_path)
    assert second.stdout == first.stdout and sorted(modules & LIGHT) == []


def test_safety_scan_of_a_card_number_writes_no_library_noise(tmp_path):
    card = tmp_path / "card.txt"
    card.write_text("pay with 4111 1111 1111 1111 today\n")
    result = tisslm("safety", "scan", str(card), cwd=tmp_path)
    assert result.returncode == 1 and "pii CARD_NUMBER: redact" in result.stdout
    # Presidio, which checked these once, brought in torchao's and torch's notices; keep stderr clean.
    assert result.stderr == ""


def test_safety_scan_finds_unquoted_secrets(tmp_path):
    """`aws_secret_access_key = wJalr...` and `AWS_SECRET_ACCESS_KEY=q8Hd...` passed the scan (issue 24)."""
    credentials = tmp_path / "credentials"
    credentials.write_text(
        "[default]\naws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
        "AWS_SECRET_ACCESS_KEY=q8Hd3kLz9PqW2mXv7RtY5nB1cJ4sF6gA0eU8iO2w\n"
    )
    result = tisslm("safety", "scan", "--json", str(credentials), cwd=tmp_path)
    verdict = json.loads(result.stdout)
    assert result.returncode == 1 and [f["category"] for f in verdict["findings"]] == ["secrets", "secrets"]
    assert "wJalr" not in verdict["text"] and "q8Hd" not in verdict["text"]
    assert verdict["text"].count("<SECRET>") == 2

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
    assert "<EMAIL>" in engine.variables["answer"] and "bq@" not in engine.variables["answer"]


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

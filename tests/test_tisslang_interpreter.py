"""TissLang engine: semantics, budgets, review, audit, the model adapter, and the shipped examples."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_tisslang_security as security
from serving import ServerProcess, save_tiny_model

from tisslm.agent.adapter import AdapterError, Completion, LocalModel, OpenAICompatible
from tisslm.agent.audit import AuditLog, read_audit, sha256
from tisslm.agent.checks import check, check_warnings
from tisslm.agent.interpreter import DEFAULT_TOP, ReviewDenied, ScriptFailure
from tisslm.agent.parser import parse
from tisslm.agent.progress import ModelProgress
from tisslm.agent.review import Reviewer
from tisslm.core.chat import CHAT_TEMPLATE_FILE, ChatTemplate
from tisslm.core.tokenizer import byte_level_tokenizer
from tisslm.kb import Hit, build_index

workspace = security.workspace  # the fixture, shared
run_script = security.run_script

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples" / "tiss").glob("*.tiss"))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model")


KB_CORPUS = {
    "slug.py": '''"""Slugs for titles."""


def slugify(title):
    """Turn a title into a URL slug: lowercase words joined by hyphens."""
    return "-".join(title.lower().split())
''',
    "stats.py": '''def mean(values):
    """The arithmetic mean of a list of numbers."""
    return sum(values) / len(values)


def median(values):
    """The middle value of the sorted numbers."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
''',
}


def build_kb(out: Path, corpus: dict[str, str] = KB_CORPUS) -> Path:
    """A small knowledge base of `corpus` (file name -> Python source) in `out`."""
    source = out.parent / (out.name + "-corpus")
    for name, text in corpus.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text)
    build_index(out, directory=source, include=["**/*.py"], progress=False)
    return out


@pytest.fixture(scope="session")
def tiss_kb(tmp_path_factory) -> Path:
    """The knowledge base that RETRIEVE tests and scenarios search: slug.py and stats.py."""
    return build_kb(tmp_path_factory.mktemp("kb") / "kb")


@pytest.fixture(scope="session")
def tiss_kb_open(tiss_kb):
    from tisslm.kb import KnowledgeBase

    with KnowledgeBase.open(tiss_kb) as kb:
        yield kb


class FixedKB:
    """A knowledge-base double that returns the same hits (best first) for every query."""

    def __init__(self, *hits: Hit):
        self.hits, self.queries = list(hits), []

    def search(self, query: str, k: int = 10, mode: str = "fused") -> list[Hit]:
        self.queries.append((query, k))
        return self.hits[:k]


class Answers:
    """A model double that answers from a list, for the tests that need a known reply (and entropies)."""

    name = "answers"

    def __init__(self, *replies: str, entropies: tuple[float, ...] = ()):
        self.replies, self.prompts, self.systems, self.entropies = list(replies), [], [], entropies

    def complete(self, prompt: str, max_tokens: int = 256, seed: int = 0, system: str | None = None) -> Completion:
        self.prompts.append(prompt)
        self.systems.append(system)
        return Completion(self.replies.pop(0), 10, 5, self.entropies)


def test_a_failing_command_is_data_not_an_error(workspace):
    engine, said = run_script(
        'RUN "echo out; echo err >&2; exit 3"\n'
        'ASSERT LAST_RUN.EXIT_CODE == 3 AND LAST_RUN.STDOUT == "out\\n" AND LAST_RUN.STDERR CONTAINS "err"\n'
        "ASSERT NOT LAST_RUN.TIMED_OUT AND LAST_RUN.DURATION < 2\n"
        'IF LAST_RUN.EXIT_CODE != 0 THEN { VAR status = "failed" } ELSE { VAR status = "passed" }\n',
        workspace,
    )
    assert engine.variables["status"] == "failed" and "[exit 3" in said


def test_a_failed_assert_halts_with_its_span_and_try_catches_it(workspace):
    with pytest.raises(ScriptFailure) as failure:
        run_script('RUN "exit 1"\nSTEP "s" {\n    ASSERT LAST_RUN.EXIT_CODE == 0\n}\nLOG "never"', workspace)
    assert (failure.value.kind, failure.value.span.line, failure.value.span.column) == ("assertion failed", 4, 5)
    _, said = run_script('TRY {\n ASSERT 1 == 2\n LOG "skipped"\n} CATCH {\n LOG "caught {{LAST_ERROR}}"\n}', workspace)
    assert "caught assertion failed: 1 == 2" in said and "skipped" not in said


def test_expressions_compare_numbers_text_and_patterns(workspace):
    engine, _ = run_script(
        'VAR n = "10"\nASSERT n > 9 AND n == 10.0 AND "abc" < "abd"\n'
        'ASSERT "hello world" MATCHES "^hel+o\\\\s" AND "x" NOT CONTAINS "y" AND "  " IS_EMPTY\n'
        'WRITE "f.txt" <<EOF\nx\nEOF\nASSERT FILE "f.txt" EXISTS AND NOT (FILE "nope" EXISTS)\n'
        "VAR flag = TRUE\nASSERT flag == TRUE AND (flag OR FALSE)\n",
        workspace,
    )
    assert engine.variables["flag"] is True


def test_parallel_runs_concurrently(workspace):
    start = time.monotonic()
    engine, _ = run_script('PARALLEL {\n RUN "sleep 0.6"\n RUN "sleep 0.6; exit 4"\n RUN "sleep 0.6"\n}', workspace)
    assert time.monotonic() - start < 1.5  # three 0.6 s sleeps, not 1.8 s in a row
    assert engine.last_run.exit_code == 4  # LAST_RUN is the first that failed
    assert engine.outcome.runs == 3


def test_execution_time_budget_stops_the_run(workspace):
    with pytest.raises(ScriptFailure) as failure:
        run_script('SET_BUDGET EXECUTION_TIME = "1s"\nRUN "sleep 5"', workspace, timeout_s=10)
    assert failure.value.kind == "budget exhausted"


def test_model_calls_and_tokens_are_budgeted(workspace):
    model = Answers("one", "two")
    engine, _ = run_script(
        'SET_BUDGET API_CALLS = 1\n@persona "a tester"\nPROMPT_AGENT "say {{x}}" INTO a\n'
        'TRY { PROMPT_AGENT "again" INTO b } CATCH { LOG "{{LAST_ERROR}}" }',
        workspace,
        adapter=model,
        variables={"x": "hi"},
    )
    assert engine.variables["a"] == "one" and "b" not in engine.variables
    assert "API_CALLS budget of 1 is used up" in engine.variables["LAST_ERROR"]
    assert model.prompts == ["say hi"] and model.systems == ["You are: a tester"]  # the persona: a system message
    with pytest.raises(ScriptFailure, match="TOKEN_COUNT"):
        run_script('SET_BUDGET TOKEN_COUNT = 10\nPROMPT_AGENT "p" INTO a', workspace, adapter=Answers("x"))


def test_last_prompt_entropies_can_be_asserted_and_are_audited(workspace, tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl", workspace)
    engine, said = run_script(
        'PROMPT_AGENT "fix it" INTO fix\n'
        "ASSERT LAST_PROMPT.MEAN_ENTROPY == 1.5 AND LAST_PROMPT.MAX_ENTROPY == 3\n"
        'TRY { ASSERT LAST_PROMPT.MAX_ENTROPY < 2 } CATCH { LOG "unsure: {{LAST_ERROR}}" }\n'
        "VAR confident = LAST_PROMPT.MEAN_ENTROPY < 2\n",
        workspace,
        adapter=Answers("patch", entropies=(0.5, 1.0, 3.0)),
        audit=audit,
    )
    audit.close()
    assert engine.variables["confident"] is True
    assert "unsure: assertion failed: LAST_PROMPT.MAX_ENTROPY < 2" in said
    events = read_audit(tmp_path / "audit.jsonl")
    (call,) = [e for e in events if e["event"] == "model_call"]
    (prompt,) = [e for e in events if e.get("type") == "PromptAgent"]
    assert (call["mean_entropy"], call["max_entropy"]) == (prompt["mean_entropy"], prompt["max_entropy"]) == (1.5, 3.0)
    run_script(
        'PROMPT_AGENT "x" INTO x\nASSERT LAST_PROMPT.MAX_ENTROPY == 0', workspace, adapter=Answers("")
    )  # no tokens
    with pytest.raises(ScriptFailure) as failure:
        run_script('LOG "x"\nASSERT LAST_PROMPT.MEAN_ENTROPY < 1', workspace)
    assert (failure.value.kind, failure.value.span.line, failure.value.span.column) == ("no prompt yet", 3, 8)


def test_a_retrieved_chunk_reaches_the_prompt(workspace, tiss_kb_open):
    model = Answers("use hyphens")
    engine, said = run_script(
        'RETRIEVE "how is a {{thing}} turned into a URL slug" INTO context TOP 2\n'
        'PROMPT_AGENT "{{context}}\\nQuestion: how are slugs made?" INTO answer\n',
        workspace,
        adapter=model,
        kb=tiss_kb_open,
        variables={"thing": "title"},
    )
    (prompt,) = model.prompts
    block = '# slug.py:4-6 slug.slugify\ndef slugify(title):\n    """Turn a title into a URL slug'
    assert block in engine.variables["context"] and block in prompt
    assert prompt.endswith("\nQuestion: how are slugs made?") and engine.variables["answer"] == "use hyphens"
    assert "retrieved 2 chunks for 'how is a title turned into a URL slug'" in said


def test_retrieve_puts_the_most_relevant_chunk_last_and_audits_it(workspace, tmp_path):
    best = Hit("a.py", "a.best", 3, 4, 0.9, "def best():\n    pass\n")
    second = Hit("docs/b.md", "Usage > Install", 1, 2, 0.5, "pip install it")
    kb = FixedKB(best, second)
    audit = AuditLog(tmp_path / "audit.jsonl", workspace)
    engine, _ = run_script('RETRIEVE "q" INTO ctx\nRETRIEVE "r" INTO one TOP 1', workspace, kb=kb, audit=audit)
    audit.close()
    assert engine.variables["ctx"] == (
        "# docs/b.md:1-2 Usage > Install\npip install it\n\n# a.py:3-4 a.best\ndef best():\n    pass\n"
    )
    assert engine.variables["one"] == "# a.py:3-4 a.best\ndef best():\n    pass\n"
    assert kb.queries == [("q", DEFAULT_TOP), ("r", 1)]
    first = next(e for e in read_audit(tmp_path / "audit.jsonl") if e.get("type") == "Retrieve")
    assert (first["span"], first["query"], first["top"], first["into"]) == ([2, 1], "q", DEFAULT_TOP, "ctx")
    assert first["hits"][0] == {
        "path": "a.py", "name": "a.best", "lines": [3, 4], "score": 0.9, "sha256": sha256(best.text)
    }  # fmt: skip
    assert first["sha256"] == sha256(engine.variables["ctx"])


def test_retrieve_without_a_knowledge_base_fails_at_its_span_and_try_catches_it(workspace, tiss_kb_open):
    with pytest.raises(ScriptFailure) as failure:
        run_script('LOG "x"\nSTEP "s" {\n    RETRIEVE "q" INTO ctx\n}', workspace)
    assert (failure.value.kind, failure.value.span.line, failure.value.span.column) == ("no knowledge base", 4, 5)
    assert "pass --kb DIR" in str(failure.value)
    engine, _ = run_script('TRY { RETRIEVE "q" INTO ctx } CATCH { VAR ctx = "" }\nASSERT ctx IS_EMPTY', workspace)
    assert engine.variables["LAST_ERROR"].startswith("no knowledge base: RETRIEVE needs a knowledge base")
    engine, _ = run_script(
        'TRY { RETRIEVE "{{empty}}" INTO ctx } CATCH { LOG "{{LAST_ERROR}}" }',
        workspace,
        kb=tiss_kb_open,
        variables={"empty": " "},
    )
    assert engine.variables["LAST_ERROR"] == "retrieval failed: kb search: the query is empty"


def test_estimate_cost_runs_nothing(workspace):
    engine, _ = run_script('ESTIMATE_COST {\n RUN "touch made"\n PROMPT_AGENT "12345678" INTO x\n}', workspace)
    assert not (workspace / "made").exists() and "x" not in engine.variables
    assert engine.outcome.estimates == [{"commands": 1, "writes": 0, "model_calls": 1, "tokens": 3 + 256}]


def test_reviews_ask_on_the_terminal_and_a_no_cannot_be_caught(workspace):
    answers = io.StringIO("y\n2\nn\n")
    reviewer = Reviewer("ask", stdin=answers, stdout=io.StringIO(), interactive=True)
    script = (
        'PAUSE "go on?"\nCHOOSE {\n OPTION "a" { VAR picked = "a" }\n OPTION "b" { VAR picked = "b" }\n}\n'
        'TRY { REQUEST_REVIEW "ship it?" } CATCH { LOG "a no must not be caught" }'
    )
    with pytest.raises(ReviewDenied):
        run_script(script, workspace, reviewer=reviewer)
    with pytest.raises(ReviewDenied, match="needs a reviewer"):
        run_script('PAUSE "nobody is there"', workspace, reviewer=Reviewer("ask", interactive=False))


def test_the_model_picks_when_nobody_can(workspace):
    engine, said = run_script(
        'CHOOSE {\n OPTION "a" { VAR picked = "a" }\n OPTION "b" { VAR picked = "b" }\n}',
        workspace,
        adapter=Answers(" 2"),
        reviewer=Reviewer("ask", interactive=False),
    )
    assert engine.variables["picked"] == "b" and "chosen by model:answers" in said


def test_audit_log_records_every_node_command_write_and_approval(workspace, tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl", workspace)
    run_script('STEP "s" {\n RUN "echo hi"\n WRITE "a.txt" <<EOF\nbody\nEOF\n PAUSE "ok?"\n}', workspace, audit=audit)
    audit.close()
    events = read_audit(tmp_path / "audit.jsonl")
    assert [e["event"] for e in events] == ["start", "node", "node", "node", "approval", "node", "end"]
    assert events[0]["sandbox"]["profile"] == "bwrap" and events[-1]["status"] == "ok"
    step, run, write, approval = events[1:5]
    assert step["span"] == [2, 1] and run["span"] == [3, 2]
    assert (run["command"], run["exit_code"], run["sandbox"]) == ("echo hi", 0, "bwrap")
    assert run["stdout_sha256"] == sha256("hi\n")
    assert write["sha256"] == sha256("body\n") == sha256((workspace / "a.txt").read_text())
    assert (approval["kind"], approval["approved"], approval["by"]) == ("PAUSE", True, "--approve-all")
    with pytest.raises(Exception, match="inside the workspace"):
        AuditLog(workspace / "audit.jsonl", workspace)


def chat_prompt_tokens(prompt: str, system: str | None = None, template: ChatTemplate | None = None) -> int:
    """Tokens of the conversation [system?, user: prompt] as the template renders it for a reply."""
    messages = [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": prompt}]
    return len((template or ChatTemplate()).prompt_ids(byte_level_tokenizer(), messages))


def test_local_model_adapter_is_seeded_and_counts_tokens(tiny_model_dir):
    model = LocalModel(tiny_model_dir)
    first, again = model.complete("def f(", 12, seed=5), model.complete("def f(", 12, seed=5)
    assert first == again and first.prompt_tokens == chat_prompt_tokens("def f(") and 1 <= first.completion_tokens <= 12
    assert len(first.entropies) == first.completion_tokens and all(h > 0 for h in first.entropies)
    assert first.max_entropy == max(first.entropies) and first.mean_entropy <= first.max_entropy
    assert [model.complete("def f(", 12, seed=s).text for s in range(4)] != [first.text] * 4


def test_local_model_adapter_asks_through_the_directorys_chat_template(tiny_model_dir, tmp_path):
    import shutil

    custom = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    model_dir = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / CHAT_TEMPLATE_FILE).write_text(custom)
    reply = LocalModel(model_dir).complete("def f(", 4, seed=1, system="You are: terse")
    # byte-level: one token per byte of "[system] You are: terse\n[user] def f(\n[assistant] "
    expected = chat_prompt_tokens("def f(", "You are: terse", ChatTemplate(custom))
    assert reply.prompt_tokens == expected == len("[system] You are: terse\n[user] def f(\n[assistant] ")
    refusing = "{{ raise_exception('no system messages') if messages[0]['role'] == 'system' else '' }}"
    (model_dir / CHAT_TEMPLATE_FILE).write_text(refusing)
    with pytest.raises(AdapterError, match="no system messages"):
        LocalModel(model_dir).complete("x", 4, system="s")


def test_base_url_adapter_talks_to_a_real_server(tiny_model_dir, tmp_path, workspace):
    server = ServerProcess(tiny_model_dir, workdir=tmp_path)
    try:
        adapter = OpenAICompatible(server.url)
        reply = adapter.complete("hello", 8, seed=3)
        assert reply == adapter.complete("hello", 8, seed=3)
        assert reply.prompt_tokens == chat_prompt_tokens("hello") and 1 <= reply.completion_tokens <= 8
        # The server scores its tokens as it decodes; the local model, in one pass afterwards: the same.
        # Both ask through the model's chat template, so they read the same prompt.
        local = LocalModel(tiny_model_dir).complete("hello", 8, seed=3)
        assert local.text == reply.text and len(local.entropies) == len(reply.entropies) > 0
        assert all(abs(a - b) < 1e-4 for a, b in zip(local.entropies, reply.entropies, strict=True))
        persona = adapter.complete("hello", 8, seed=3, system="You are: terse")
        assert persona.prompt_tokens == chat_prompt_tokens("hello", "You are: terse")
        assert persona.text == LocalModel(tiny_model_dir).complete("hello", 8, seed=3, system="You are: terse").text
        engine, _ = run_script('PROMPT_AGENT "hello" INTO answer', workspace, adapter=adapter)
        assert isinstance(engine.variables["answer"], str) and engine.budget.calls_used == 1
    finally:
        server.stop()


@pytest.fixture(scope="module")
def agent_kb(tmp_path_factory) -> Path:
    """A knowledge base of the agent's own code, which examples/tiss/retrieve_and_ask.tiss asks about."""
    out = tmp_path_factory.mktemp("agent-kb") / "kb"
    build_index(out, directory=REPO / "src" / "tisslm" / "agent", include=["**/*.py"], progress=False)
    return out


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_examples_run(example, tiny_model_dir, agent_kb, tmp_path, workspace):
    result = subprocess.run(
        [sys.executable, "-m", "tisslm.cli", "tiss", "run", str(example), "--workspace", str(workspace),
         "--approve-all", "--model", str(tiny_model_dir), "--audit", str(tmp_path / "audit.jsonl"),
         "--command-timeout", "3", "--kb", str(agent_kb)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    events = read_audit(tmp_path / "audit.jsonl")
    assert events[-1]["status"] == "ok"
    assert all(e["hits"] for e in events if e.get("type") == "Retrieve")  # every RETRIEVE found something


def test_there_are_examples_for_each_kind_of_script():
    names = {e.stem for e in EXAMPLES}
    assert {"hello", "fix_tests", "setup_and_test", "recover", "choose_review", "retrieve_and_ask"} <= names


# ---- issue 24: --var precedence, {{LAST_RUN.FIELD}}, ASSERT's explanation, model progress ----------


def test_a_var_given_from_outside_wins_over_the_scripts_var_and_check_warns(workspace, tmp_path):
    text = 'VAR expected = 3\nVAR other = 1\nLOG "expected {{expected}}, other {{other}}"\n'
    audit = AuditLog(tmp_path / "audit.jsonl", workspace)
    engine, said = run_script(text, workspace, variables={"expected": "4"}, audit=audit)
    audit.close()
    assert engine.variables["expected"] == "4" and "expected 4, other 1" in said
    (skipped,) = [e for e in read_audit(tmp_path / "audit.jsonl") if e.get("type") == "Var" and e.get("skipped")]
    assert (skipped["name"], skipped["skipped"]) == ("expected", "given with --var")
    script = parse("#TISS!\n" + text + 'READ "f" AS other\n')
    found = [(w.line, w.severity, w.message) for w in check_warnings(script, ["expected", "other"])]
    assert found[0][:2] == (2, "warning") and "--var expected=... on the command line wins" in found[0][2]
    assert found[1][0] == 3 and found[2][0] == 5 and "replaces its value" in found[2][2]
    assert check_warnings(script, []) == []  # no conflict without --var
    engine, _ = run_script(text, workspace)
    assert engine.variables["expected"] == 3  # and the script's VAR without one


def test_last_run_and_last_prompt_fields_are_interpolated(workspace):
    engine, said = run_script(
        'RUN "echo \'a b\'; exit 3"\nLOG "exit {{LAST_RUN.EXIT_CODE}}, out {{ LAST_RUN.STDOUT }}"\n'
        'RUN "printf %s {{LAST_RUN.STDOUT}}"\nPROMPT_AGENT "x" INTO y\nLOG "sure {{LAST_PROMPT.MAX_ENTROPY}}"\n'
        'LOG "{{LAST_RUN.CODE}} {{LAST_RUN}} {{ nope nope }}"\n',
        workspace,
        adapter=Answers("y", entropies=(0.5, 2.0)),
    )
    assert "exit 3, out a b\n" in said and "sure 2.0" in said
    assert engine.last_run.stdout == "a b\n"  # shell-quoted in RUN: one word, the newline kept
    assert "{{LAST_RUN.CODE}} {{LAST_RUN}} {{ nope nope }}" in said  # not placeholders: printed as they are
    with pytest.raises(ScriptFailure) as failure:
        run_script('LOG "{{LAST_RUN.STDOUT}}"', workspace)
    assert (failure.value.kind, failure.value.span.line) == ("no command yet", 2)


def test_check_warns_about_placeholders_it_does_not_know():
    script = parse(
        '#TISS!\nLOG "{{LAST_RUN.EXIT_CODE}} {{LAST_RUN.CODE}}"\nRUN "echo {{ LAST_RUN.stdout }}"\n'
        'ASSERT "x" == "{{a.b}}"\nWRITE "t" <<\'EOF\'\n{{literal}}\nEOF\nLOG "{{LAST_PROMPT.MEAN_ENTROPY}}"\n'
    )
    assert check(script) == []  # a field is no variable: not "undefined"
    found = [(w.line, w.column, w.message) for w in check_warnings(script)]
    assert [(line, column) for line, column, _ in found] == [(2, 1), (3, 1), (4, 15)]
    assert "{{LAST_RUN.CODE}} is not a field of LAST_RUN: did you mean {{LAST_RUN.EXIT_CODE}}?" in found[0][2]
    assert "did you mean {{LAST_RUN.STDOUT}}?" in found[1][2]
    assert "unsupported placeholder {{a.b}} is printed literally" in found[2][2]


def test_a_failed_assert_shows_its_interpolated_condition_and_the_values_it_compared(workspace):
    with pytest.raises(ScriptFailure) as failure:
        run_script(
            'RUN "echo 3"\nASSERT LAST_RUN.STDOUT CONTAINS "{{expected}}"', workspace, variables={"expected": "4"}
        )
    assert str(failure.value) == (
        "assertion failed: LAST_RUN.STDOUT CONTAINS \"4\" (LAST_RUN.STDOUT was '3\\n'; LAST_RUN.EXIT_CODE was 0)"
    )
    with pytest.raises(ScriptFailure) as failure:
        run_script(
            'RUN "seq 1 20000; echo oops >&2"\nVAR n = 7\nASSERT n > 8 OR LAST_RUN.STDOUT CONTAINS "x"', workspace
        )
    message = str(failure.value)
    assert message.startswith(
        'assertion failed: (n > 8) OR (LAST_RUN.STDOUT CONTAINS "x") (n was 7; LAST_RUN.STDOUT was '
    )
    assert "'1\\n2\\n3\\n" in message and "characters] ..." in message and "19999\\n20000\\n'" in message
    assert "LAST_RUN.STDERR was 'oops\\n'" in message and len(message) < 800  # 108894 characters of stdout, cut


def test_model_calls_show_progress_on_stderr_not_stdout(workspace, tiny_model_dir, capsys):
    shown = io.StringIO()
    _, said = run_script(
        'PROMPT_AGENT "x" INTO y\nCHOOSE {\n OPTION "a" { LOG "took a" }\n}\n',
        workspace,
        adapter=Answers("y", "1"),
        progress=ModelProgress(shown),
        reviewer=Reviewer("ask", interactive=False),  # no reviewer: the model chooses
    )
    lines = shown.getvalue().splitlines()
    assert lines[0] == "answers answering (up to 256 tokens) ..." and lines[1].startswith(
        "answers answering: 5 tokens in"
    )
    assert lines[2] == "answers answering (up to 8 tokens) ..." and len(lines) == 4
    assert "answering" not in said and "took a" in said
    # The local model reports its tokens as they come; on a terminal a spinner counts them.
    live = io.StringIO()
    counted: list[int] = []
    with ModelProgress(live, live=True)("local answering", 12) as tally:
        reply = LocalModel(tiny_model_dir).complete(
            "def f(", 12, seed=5, on_tokens=lambda n: (tally(n), counted.append(n))
        )
    assert sum(counted) == tally.count == reply.completion_tokens > 0
    assert f"local answering: {reply.completion_tokens} tokens in" in live.getvalue()
    assert capsys.readouterr().out == ""

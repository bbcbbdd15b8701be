"""Step definitions for tests/features/tisslang/*.feature (pytest-bdd)."""

from __future__ import annotations

import io
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_tisslang_interpreter as engine_tests
import test_tisslang_security as security
from pytest_bdd import given, parsers, scenarios, then, when
from test_tisslang_interpreter import Answers

from tisslm.agent.audit import read_audit
from tisslm.agent.checks import check
from tisslm.agent.interpreter import ScriptFailure
from tisslm.agent.parser import TissSyntaxError, parse
from tisslm.agent.review import Reviewer

workspace = security.workspace  # the fixture, shared
tiss_kb, tiss_kb_open = engine_tests.tiss_kb, engine_tests.tiss_kb_open  # the knowledge base fixtures
run_script = security.run_script

scenarios("features/tisslang")


@pytest.fixture
def ctx() -> dict:
    return {}


# ---- scripts run in process ----------------------------------------------------------------------


@given("the script:")
def the_script(ctx, docstring):
    ctx["text"] = docstring


def _run(ctx, workspace, **options):
    text = ctx["text"].removeprefix("#TISS!\n")  # run_script adds the header back
    said: list[str] = []  # kept here, so that what a failed run said can be checked too
    start = time.monotonic()
    try:
        ctx["engine"], _ = run_script(text, workspace, say=said.append, **options)
    except ScriptFailure as failure:
        ctx["failure"] = failure
    ctx["took"] = time.monotonic() - start
    ctx["said"], ctx["workspace"] = "\n".join(said), workspace


@when("I run it")
def run_it(ctx, workspace):
    _run(ctx, workspace)


@when("I run it denying every review")
def run_denying(ctx, workspace):
    _run(ctx, workspace, reviewer=Reviewer("deny", interactive=False))


@when(parsers.parse('I run it with the reviewer answering "{answer}"'))
def run_reviewer(ctx, workspace, answer):
    reviewer = Reviewer("ask", stdin=io.StringIO(answer + "\n"), stdout=io.StringIO(), interactive=True)
    _run(ctx, workspace, reviewer=reviewer)


@when(parsers.parse('I run it with the model answering "{answer}"'))
def run_model(ctx, workspace, answer):
    ctx["model"] = Answers(answer, answer)
    _run(ctx, workspace, adapter=ctx["model"])


@when(parsers.parse('I run it with {name} set to "{value}" and the model answering "{answer}"'))
def run_var_model(ctx, workspace, name, value, answer):
    ctx["model"] = Answers(answer)
    _run(ctx, workspace, adapter=ctx["model"], variables={name: value})


@when("I run it with the knowledge base")
def run_kb(ctx, workspace, tiss_kb_open):
    _run(ctx, workspace, kb=tiss_kb_open)


@when(parsers.parse('I run it with the knowledge base and the model answering "{answer}"'))
def run_kb_model(ctx, workspace, tiss_kb_open, answer):
    ctx["model"] = Answers(answer)
    _run(ctx, workspace, kb=tiss_kb_open, adapter=ctx["model"])


@when(parsers.parse('I run it with {name} set to "{value}"'))
def run_var(ctx, workspace, name, value):
    _run(ctx, workspace, variables={name: value})


@then("it succeeds")
def succeeds(ctx):
    assert "failure" not in ctx, ctx.get("failure")


@then(parsers.parse('it fails with "{kind}" at line {line:d}, column {column:d}'))
def fails_at(ctx, kind, line, column):
    failure = ctx["failure"]
    assert (failure.kind, failure.span.line, failure.span.column) == (kind, line, column), failure


@then(parsers.parse('the output shows "{text}"'))
def output_shows(ctx, text):
    assert text in ctx["said"], ctx["said"]


@then(parsers.parse('the output does not show "{text}"'))
def output_lacks(ctx, text):
    assert text not in ctx["said"]


@then(parsers.parse('the file "{path}" contains exactly:'))
def file_is(ctx, path, docstring):
    assert (ctx["workspace"] / path).read_text() == docstring + "\n"


@then(parsers.parse('the file "{path}" does not exist'))
def file_absent(ctx, path):
    assert not (ctx["workspace"] / path).exists()


@then(parsers.parse('the variable {name} is "{value}"'))
def variable_is(ctx, name, value):
    assert ctx["engine"].variables[name] == value


@then(parsers.parse('the variable {name} ends with the chunk "{header}"'))
def variable_ends_with_chunk(ctx, name, header):
    value = ctx["engine"].variables[name]
    headers = re.findall(r"^# (\S+:\d+-\d+ .*)$", value, flags=re.M)  # `# path:start-end name`
    assert headers and headers[-1] == header, value


@then(parsers.parse('the model\'s prompt contains "{text}"'))
def prompt_contains(ctx, text):
    assert any(text.replace("\\n", "\n") in prompt for prompt in ctx["model"].prompts), ctx["model"].prompts


@then(parsers.parse("it took less than {seconds:f} seconds"))
def took_less(ctx, seconds):
    assert ctx["took"] < seconds


@then(parsers.parse('the model was asked "{prompt}"'))
def model_asked(ctx, prompt):
    assert ctx["model"].prompts == [prompt.replace("\\n", "\n")]


@then(parsers.parse('the model\'s system message was "{system}"'))
def model_system(ctx, system):
    assert ctx["model"].systems == [system.replace("\\n", "\n")]


# ---- checking ------------------------------------------------------------------------------------


@when("I check it")
def check_it(ctx):
    try:
        script = parse(ctx["text"], "t.tiss")
        ctx["errors"] = [(d.line, d.column, d.message) for d in check(script)]
    except TissSyntaxError as err:
        ctx["errors"] = [(d.line, d.column, d.message) for d in err.diagnostics]


@then(parsers.parse('there is an error at line {line:d}, column {column:d} saying "{message}"'))
def error_at(ctx, line, column, message):
    assert any((ln, col) == (line, column) and message in m for ln, col, m in ctx["errors"]), ctx["errors"]


@then(parsers.parse("there are {count:d} errors"))
def error_count(ctx, count):
    assert len(ctx["errors"]) == count, ctx["errors"]


# ---- the command line, as a real process -----------------------------------------------------------


@given(parsers.parse('the script file "{name}":'))
def script_file(tmp_path, name, docstring):
    (tmp_path / name).write_text(docstring + "\n")


@when(parsers.parse("I run `tiss {args}`"))
def run_cli(ctx, request, tmp_path, workspace, args):
    kb = request.getfixturevalue("tiss_kb") if "{kb}" in args else None  # built only when a scenario needs it
    argv = [a.format(workspace=workspace, audit=tmp_path / "audit.jsonl", kb=kb) for a in shlex.split(args)]
    ctx["cli"] = subprocess.run(
        [sys.executable, "-m", "tisslm.cli", "tiss", *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    ctx["workspace"], ctx["audit"] = workspace, tmp_path / "audit.jsonl"


@then(parsers.parse("the exit status is {code:d}"))
def exit_status(ctx, code):
    assert ctx["cli"].returncode == code, ctx["cli"].stdout + ctx["cli"].stderr


@then(parsers.parse('stdout shows "{text}"'))
def stdout_shows(ctx, text):
    assert text in ctx["cli"].stdout, ctx["cli"].stdout


@then(parsers.parse('stderr shows "{text}"'))
def stderr_shows(ctx, text):
    assert text in ctx["cli"].stderr, ctx["cli"].stderr


@then("stderr shows:")
def stderr_block(ctx, docstring):
    assert docstring in ctx["cli"].stderr, ctx["cli"].stderr


@then(parsers.parse('stdout is JSON whose step {n:d} is a "{kind}" at "{at}"'))
def plan_json(ctx, n, kind, at):
    plan = json.loads(ctx["cli"].stdout)
    step = plan["steps"][n - 1]
    assert (step["type"], step["at"]) == (kind, at)
    assert plan["ast"]["type"] == "Script"


@then(parsers.parse('the workspace file "{path}" contains "{text}"'))
def workspace_file(ctx, path, text):
    assert text in (Path(ctx["workspace"]) / path).read_text()


@then(parsers.parse('the audit log shows {runs:d} commands run in the "{profile}" sandbox and ends "{status}"'))
def audit_summary(ctx, runs, profile, status):
    events = read_audit(ctx["audit"])
    commands = [e for e in events if e.get("type") == "Run"]
    assert len(commands) == runs and {e["sandbox"] for e in commands} == {profile}
    assert events[0]["event"] == "script" and len(events[0]["sha256"]) == 64
    assert events[-1]["status"] == status


@then(parsers.parse('the audit log records the retrieval of "{query}" with {count:d} hits'))
def audit_retrieval(ctx, query, count):
    (event,) = [e for e in read_audit(ctx["audit"]) if e.get("type") == "Retrieve"]
    assert (event["query"], len(event["hits"])) == (query, count)
    assert all(len(hit["sha256"]) == 64 and len(hit["lines"]) == 2 for hit in event["hits"])

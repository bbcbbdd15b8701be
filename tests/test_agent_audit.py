"""TissLang's audit log is the safety audit log: an agent run's records are hash-chained and
anchored by a signed head, and `tisslm audit verify` checks them and catches tampering."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_tisslang_security import run_script

from tisslm.agent.audit import AuditLog, read_audit, sha256
from tisslm.core.errors import TissLMError
from tisslm.safety.audit import head_path, verify

SCRIPT = 'STEP "s" {\n WRITE "a.txt" <<EOF\nbody\nEOF\n LOG "written"\n}\nVAR x = "y"'


def audit_verify(path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tisslm.cli", "audit", "verify", str(path), "--json"]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def agent_run(tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    path = tmp_path / "logs" / "run.jsonl"
    log = AuditLog(path, workspace)
    log.record("script", path="demo.tiss", sha256=sha256(SCRIPT), when=tmp_path)  # a Path: written as its str
    run_script(SCRIPT, workspace, sandbox="none", audit=log)
    log.close()
    return path, workspace


def test_an_agent_runs_log_is_chained_and_verifies(tmp_path):
    path, workspace = agent_run(tmp_path)
    events = read_audit(path)
    assert [e["event"] for e in events][:2] == ["script", "start"] and events[-1]["event"] == "end"
    assert events[-1]["status"] == "ok" and events[0]["when"] == str(tmp_path)
    (write,) = [e for e in events if e.get("type") == "Write"]
    assert write["sha256"] == sha256("body\n") == sha256((workspace / "a.txt").read_text())
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))  # the safety log's chain
    result = verify(path)
    assert result.ok and result.records == len(events)
    cli = audit_verify(path)
    assert cli.returncode == 0 and json.loads(cli.stdout)["records"] == len(events)


def test_tampering_an_agent_runs_log_is_detected(tmp_path):
    path, _ = agent_run(tmp_path)
    rows = path.read_text().splitlines(keepends=True)
    # An edited record: the written file's hash replaced.
    edited = [json.loads(r) for r in rows]
    index = next(i for i, e in enumerate(edited) if e.get("type") == "Write")
    edited[index]["sha256"] = sha256("something else\n")
    path.write_text("".join(json.dumps(e) + "\n" for e in edited))
    assert (verify(path).ok, verify(path).problem, verify(path).seq) == (False, "altered", index + 1)
    cli = audit_verify(path)
    assert cli.returncode == 1 and json.loads(cli.stdout)["problem"] == "altered"
    # The end of the run cut off (its failure, say), chain intact: the head catches it.
    path.write_text("".join(rows[:-2]))
    assert (verify(path).ok, verify(path).problem) == (False, "truncated")
    assert json.loads(audit_verify(path).stdout)["problem"] == "truncated"
    path.write_text("".join(rows))
    head_path(path).unlink()
    assert verify(path).problem == "head_missing"


def test_the_log_is_refused_inside_the_workspace(tmp_path):
    with pytest.raises(TissLMError, match="inside the workspace"):
        AuditLog(tmp_path / "audit.jsonl", tmp_path)

"""The HumanEval executor (agent/humaneval.py) against the real bubblewrap sandbox, hostile completions included."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tisslm.agent.humaneval import DEFAULT_LIMITS, check_completion, pass_at_k

FAST = dataclasses.replace(DEFAULT_LIMITS, timeout_s=2.0, cpu_s=2)


def correct_body(humaneval_problems) -> str:
    return humaneval_problems["HumanEval/0"]["canonical_solution"]


def test_canonical_solution_passes(humaneval_problems, locked_workspace):
    outcome = check_completion(
        humaneval_problems["HumanEval/0"], correct_body(humaneval_problems), locked_workspace, FAST
    )
    assert (outcome.passed, outcome.status) == (True, "passed"), outcome.detail
    assert list(locked_workspace.iterdir()) == []  # the per-check directory is gone


def test_wrong_solution_fails(humaneval_problems, locked_workspace):
    outcome = check_completion(humaneval_problems["HumanEval/0"], "    return False\n", locked_workspace, FAST)
    assert (outcome.passed, outcome.status) == (False, "failed")
    assert "AssertionError" in outcome.detail


def test_syntax_error_is_an_error(humaneval_problems, locked_workspace):
    outcome = check_completion(humaneval_problems["HumanEval/0"], "    return (\n", locked_workspace, FAST)
    assert (outcome.passed, outcome.status) == (False, "error")
    assert "SyntaxError" in outcome.detail


def test_endless_loop_is_stopped(humaneval_problems, locked_workspace):
    start = time.monotonic()
    outcome = check_completion(
        humaneval_problems["HumanEval/0"], "    while True:\n        pass\n", locked_workspace, FAST
    )
    assert (outcome.passed, outcome.status) == (False, "timed_out")
    assert time.monotonic() - start < 10


def test_writes_outside_the_workspace_do_not_reach_the_host(humaneval_problems, locked_workspace):
    name = f"tiss-he-escape-{uuid.uuid4().hex}"
    outside = locked_workspace.parent / name  # next to the locked_workspace, outside it
    in_tmp = Path("/tmp") / name  # the host's /tmp (the sandbox has a private one)
    var_tmp = Path(tempfile.mkdtemp(prefix="tiss-he-outside-", dir="/var/tmp"))  # on the read-only root
    var_tmp.chmod(0o777)
    try:
        targets = [str(outside), str(in_tmp), str(var_tmp / name)]
        completion = (
            f"    for target in {targets!r}:\n"
            "        try:\n"
            "            with open(target, 'w') as handle:\n"
            "                handle.write('escaped')\n"
            "        except OSError:\n"
            "            pass\n" + correct_body(humaneval_problems)
        )
        outcome = check_completion(humaneval_problems["HumanEval/0"], completion, locked_workspace, FAST)
        assert outcome.passed, outcome.detail  # the writes failed or landed in the sandbox, silently
        for target in (outside, in_tmp, var_tmp / name):
            assert not target.exists(), target
    finally:
        shutil.rmtree(var_tmp, ignore_errors=True)
        in_tmp.unlink(missing_ok=True)
        outside.unlink(missing_ok=True)


def test_environment_does_not_leak(humaneval_problems, locked_workspace, monkeypatch):
    monkeypatch.setenv("TISSLM_SECRET_PROBE", "hunter2")
    assert os.environ["TISSLM_SECRET_PROBE"] == "hunter2"
    completion = "    import os\n    assert 'TISSLM_SECRET_PROBE' not in os.environ\n" + correct_body(
        humaneval_problems
    )
    outcome = check_completion(humaneval_problems["HumanEval/0"], completion, locked_workspace, FAST)
    assert outcome.passed, outcome.detail
    leaking = "    import os\n    assert 'TISSLM_SECRET_PROBE' in os.environ\n" + correct_body(humaneval_problems)
    assert check_completion(humaneval_problems["HumanEval/0"], leaking, locked_workspace, FAST).status == "failed"


def test_no_network(humaneval_problems, locked_workspace):
    completion = (
        "    import socket\n"
        "    try:\n"
        "        socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
        "    except OSError:\n"
        "        pass\n"
        "    else:\n"
        "        raise AssertionError('network reachable')\n" + correct_body(humaneval_problems)
    )
    outcome = check_completion(humaneval_problems["HumanEval/0"], completion, locked_workspace, FAST)
    assert outcome.passed, outcome.detail


def test_every_canonical_solution_passes(humaneval_problems, locked_workspace):
    """All 164 humaneval_problems load and their canonical solutions pass in the sandbox (about 3 s on 2 cores)."""
    assert len(humaneval_problems) == 164
    failures = {}
    for task_id, problem in humaneval_problems.items():
        outcome = check_completion(problem, problem["canonical_solution"], locked_workspace)
        if not outcome.passed:
            failures[task_id] = outcome
    assert failures == {}


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (10, 3, 1, 0.3),
        (10, 3, 10, 1.0),
        (10, 1, 10, 1.0),
        (10, 0, 1, 0.0),
        (10, 0, 10, 0.0),
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (4, 2, 3, 1.0),  # n - c < k: every draw holds a correct one
    ],
)
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_matches_the_binomial_form():
    from math import comb

    for n, c, k in [(20, 5, 3), (100, 7, 10), (200, 50, 100)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))


def test_pass_at_k_rejects_nonsense():
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 0)

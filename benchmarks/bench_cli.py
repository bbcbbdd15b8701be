"""`tisslm` start-up and command latency, as a user meets it: writes benchmarks/results/cli.json.

Each command runs as a fresh process (`python -m tisslm.cli ...`, what the console script runs),
once to warm the OS's file cache and write the bytecode caches (as Python does on a user's machine,
whatever PYTHONDONTWRITEBYTECODE says), then `--runs` times; the JSON holds the median and the fastest
wall time of each, hyperfine-style. Alongside: the server's time from launch to its first
answered /health, and `python -X importtime`'s heaviest top-level imports of the light commands
(cumulative, in ms), which say where the remaining start-up time goes.

With --baseline, the same commands run on the code of a git revision (`git archive REV src`,
first on PYTHONPATH) in the same environment, alternating with this tree's runs so that a burst of
load from other processes on a shared machine hits both alike.

The inputs are made in a temporary directory: a tiny random model (`tisslm init-model`), a
knowledge base of src/tisslm/core (`tisslm kb build`), a text without personal data and one with a
card number (which makes the anonymiser load Presidio). Usage:

    python benchmarks/bench_cli.py [--runs 7] [--baseline HEAD] [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).parents[1]
RESULTS = REPO / "benchmarks" / "results" / "cli.json"
GOALS_S = {"help": 0.3, "tiss_check": 0.3, "kb_search_bm25": 0.5, "kb_search_fused": 0.5, "safety_scan": 0.5}


def commands(work: Path, kb_name: str = "kb") -> dict[str, list[str]]:
    model, kb = str(work / "model"), str(work / kb_name)
    return {
        "help": ["--help"],
        "generate_help": ["generate", "--help"],
        "serve_help": ["serve", "--help"],
        "tiss_check": ["tiss", "check", str(REPO / "examples" / "tiss" / "hello.tiss")],
        "kb_search_bm25": ["kb", "search", "--kb", kb, "--mode", "bm25", "load the params"],
        "kb_search_fused": ["kb", "search", "--kb", kb, "load the params"],
        "safety_scan": ["safety", "scan", str(work / "plain.txt")],
        "safety_scan_card_number": ["safety", "scan", str(work / "card.txt")],
        "info": ["info", "--model", model],
        "generate_16_tokens": [
            "generate",
            "--model",
            model,
            "--prompt",
            "def ",
            "--max-new-tokens",
            "16",
            "--seed",
            "0",
        ],
    }


def run_once(args: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "tisslm.cli", *args], env=env, cwd=cwd, capture_output=True)
    seconds = time.perf_counter() - start
    if result.returncode not in (0, 1):  # safety scan exits 1 when the policy would redact
        raise RuntimeError(f"tisslm {' '.join(args)}: exit {result.returncode}: {result.stderr.decode()[-500:]}")
    return seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_ready_s(model: Path, env: dict[str, str], cwd: Path) -> float:
    """Seconds from launching `tisslm serve` to its first 200 on /health."""
    port = free_port()
    start = time.perf_counter()
    command = [sys.executable, "-m", "tisslm.cli", "serve", "--model", str(model), "--port", str(port)]
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < 120:
            if process.poll() is not None:
                raise RuntimeError(f"tisslm serve exited with {process.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                    if response.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("tisslm serve: not ready after 120 s")
    finally:
        process.terminate()
        process.wait(timeout=30)


def top_imports(args: list[str], env: dict[str, str], cwd: Path, count: int = 8) -> list[dict]:
    """The heaviest top-level imports of one run (cumulative ms), from python -X importtime."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tisslm.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    rows = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or line.endswith("| imported package"):
            continue  # the header line names the columns
        _, cumulative, name = line.split("|")
        if not name.startswith("  "):  # depth 0: one space after the bar, two more per level
            rows.append({"module": name.strip(), "ms": round(int(cumulative) / 1000, 1)})
    total = round(sum(row["ms"] for row in rows), 1)
    return [{"module": "(all imports)", "ms": total}, *sorted(rows, key=lambda r: -r["ms"])[:count]]


def summary(times: list[float]) -> dict:
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3), "runs": len(times)}


def make_inputs(work: Path, env: dict[str, str]) -> None:
    tisslm = [sys.executable, "-m", "tisslm.cli"]
    small = ["--set", "model.d_model=64", "--set", "model.n_layers=2", "--set", "model.d_ff=128"]
    subprocess.run([*tisslm, "init-model", "--out", str(work / "model"), *small], env=env, check=True)
    build_kb(work / "kb", env)
    (work / "plain.txt").write_text("def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n")
    (work / "card.txt").write_text("pay with 4111 1111 1111 1111 today\n")


def build_kb(out: Path, env: dict[str, str]) -> None:
    """An index of src/tisslm/core, built by the code on env's PYTHONPATH (index formats change)."""
    core = REPO / "src" / "tisslm" / "core"
    build = [sys.executable, "-m", "tisslm.cli", "kb", "build", "--dir", str(core), "--include", "**/*.py"]
    subprocess.run([*build, "--out", str(out)], env=env, check=True, capture_output=True)


def baseline_tree(revision: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", revision, "src"], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per command (after one warm-up)")
    parser.add_argument("--baseline", help="also time this git revision's code, e.g. HEAD")
    parser.add_argument("--quick", action="store_true", help="3 runs, 1 server start")
    args = parser.parse_args()
    runs = 3 if args.quick else args.runs
    # As on a user's machine, Python caches the bytecode it compiles: an environment that turns that
    # off (PYTHONDONTWRITEBYTECODE, set on some CI and sandbox machines) would have every run
    # recompile each imported module of the project, which no warm start of an installed tool does.
    base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env = {**base, "PYTHONPATH": str(REPO / "src")}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_inputs(work, env)
        trees = {"this_tree": env}
        if args.baseline:
            old = baseline_tree(args.baseline, work / "baseline")
            trees[f"baseline_{args.baseline}"] = {**base, "PYTHONPATH": str(old)}
            build_kb(work / f"kb_baseline_{args.baseline}", trees[f"baseline_{args.baseline}"])
        argvs = {tree: commands(work, "kb" if tree == "this_tree" else f"kb_{tree}") for tree in trees}
        measured: dict[str, dict[str, list[float]]] = {tree: {} for tree in trees}
        failed: dict[str, dict[str, str]] = {tree: {} for tree in trees}
        for name in commands(work):
            for tree, tree_env in trees.items():
                try:
                    run_once(argvs[tree][name], tree_env, work)  # warm-up: the file cache, .pyc files
                except RuntimeError as err:  # the other tree may lack the command
                    failed[tree][name] = str(err).splitlines()[-1][:200].replace(str(work), "<work>")
            for _ in range(runs):
                for tree, tree_env in trees.items():
                    if name not in failed[tree]:
                        measured[tree].setdefault(name, []).append(run_once(argvs[tree][name], tree_env, work))
            print(name, {t: round(statistics.median(m[name]), 3) for t, m in measured.items() if name in m}, flush=True)
        serve = "serve_until_health_ok"
        for _ in range(1 if args.quick else 3):
            for tree, tree_env in trees.items():
                if serve in failed[tree]:
                    continue
                try:
                    measured[tree].setdefault(serve, []).append(server_ready_s(work / "model", tree_env, work))
                except RuntimeError as err:  # an older tree may not read this tree's params.yaml or model
                    failed[tree][serve] = str(err)
                    measured[tree].pop(serve, None)
        print("serve", {t: round(statistics.median(m[serve]), 3) for t, m in measured.items() if serve in m})
        light = {"help": ["--help"], **{k: v for k, v in commands(work).items() if k in GOALS_S and k != "help"}}
        imports = {name: top_imports(argv, env, work) for name, argv in light.items()}
    result = {
        "what": "wall seconds of `python -m tisslm.cli ...` as fresh processes (median and fastest of runs, after "
        "one warm-up that also writes the bytecode caches); serve_until_health_ok: launch to the first 200 on "
        "/health, tiny model",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "goals_s": GOALS_S,
        "commands": {tree: {name: summary(times) for name, times in per.items()} for tree, per in measured.items()},
        "failed": {tree: errors for tree, errors in failed.items() if errors},
        "top_imports_ms": imports,
        "note": "a shared machine: other processes' load inflates single runs; compare medians side by side",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()

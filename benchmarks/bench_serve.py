"""Serving benchmark: writes benchmarks/results/serve.json.

Starts `tisslm serve` in a subprocess on a loopback port and runs 1, 4 and 16 concurrent streaming
clients (httpx), each sending completions one after another until its share of requests is done
or the level's time budget runs out. Per level: aggregate generated tokens/s over the level's
wall time, p50/p99 time to first token and request latency, errors. The goal: 16 clients reach
at least 4x the tokens/s of one, with no errors.

Requests ask for a fixed number of tokens (`ignore_eos`), so every level does the same work per
request whatever the model samples. The model is models/model when present (the pipeline's), else
a randomly initialised one of the default shape (d_model 256, 6 layers): decode speed depends on
the shape, not on the weights. Usage: python benchmarks/bench_serve.py [--model DIR] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from tisslm.core.io import atomic_write_json
from tisslm.core.model import ModelConfig, TissLM
from tisslm.core.tokenizer import byte_level_tokenizer

RESULTS = Path(__file__).parent / "results" / "serve.json"
TRAINED = Path(__file__).parents[1] / "models" / "model"
PROMPTS = ["def ", "import os\n", "class Config:\n    def __init__(self", "for i in range(", "# Compute the "]
LEVELS = (1, 4, 16)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def start_server(model: Path, max_batch: int, workdir: Path) -> tuple[subprocess.Popen, str]:
    log = workdir / "server.log"
    command = [sys.executable, "-m", "tisslm.cli", "serve", "--model", str(model), "--port", "0",
               "--max-batch", str(max_batch), "--max-queue", "64", "--max-tokens", "512"]  # fmt: skip
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=workdir)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()}")
        found = re.search(r"on (http://\S+)", log.read_text())
        if found:
            try:
                if httpx.get(f"{found.group(1)}/health", timeout=5).status_code == 200:
                    return process, found.group(1)
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"server not ready:\n{log.read_text()}")


async def one_request(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "prompt": prompt, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
        "ignore_eos": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95,
    }  # fmt: skip
    started = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if first is None and any(c.get("text") for c in chunk["choices"]):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {"ttft_s": (first or end) - started, "latency_s": end - started, "tokens": tokens}


async def run_level(url: str, clients: int, requests: int, max_tokens: int, budget_s: float) -> dict:
    """`clients` concurrent loops share `requests` requests; none starts after `budget_s`."""
    results: list[dict] = []
    remaining = [requests]
    started = time.perf_counter()

    async def client(index: int, http: httpx.AsyncClient) -> None:
        n = index
        while remaining[0] > 0 and time.perf_counter() - started < budget_s:
            remaining[0] -= 1
            try:
                results.append(await one_request(http, url, PROMPTS[n % len(PROMPTS)], max_tokens))
            except httpx.HTTPError as err:
                results.append({"error": f"{type(err).__name__}: {err}"})
            n += clients

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    wall = time.perf_counter() - started
    done = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in done)
    ttft = [r["ttft_s"] for r in done]
    return {"results": results, "wall_s": wall, "tokens_per_s": tokens / wall, "ttft_p50_s": percentile(ttft, 50),
            "errors": len(results) - len(done)}  # fmt: skip


def summarize(clients: int, runs: list[dict]) -> dict:
    """One level over its rounds: tokens/s is the median round's; latencies pool every request."""
    results = [r for run in runs for r in run["results"]]
    done = [r for r in results if "error" not in r]
    ttft, latency = [r["ttft_s"] for r in done], [r["latency_s"] for r in done]
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(results) - len(done),
        "error_samples": sorted({r["error"] for r in results if "error" in r})[:3],
        "tokens": sum(r["tokens"] for r in done),
        "wall_s": sum(run["wall_s"] for run in runs),
        "tokens_per_s": statistics.median(run["tokens_per_s"] for run in runs),
        "tokens_per_s_rounds": [run["tokens_per_s"] for run in runs],
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "latency_p50_s": percentile(latency, 50),
        "latency_p99_s": percentile(latency, 99),
    }


def model_dir(choice: Path | None, workdir: Path) -> tuple[Path, str]:
    if choice is not None:
        return choice, str(choice)
    if (TRAINED / "config.json").is_file():
        return TRAINED, "models/model (trained)"
    torch.manual_seed(0)
    out = workdir / "model"
    TissLM(ModelConfig()).save_pretrained(out, tokenizer=byte_level_tokenizer())
    return out, "random init, default shape (models/model absent)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (default: models/model, else a random one)")
    parser.add_argument("--quick", action="store_true", help="fewer requests, for a smoke run")
    args = parser.parse_args()
    max_tokens, rounds = (32, 1) if args.quick else (128, 3)
    per_round = {1: 2, 4: 4, 16: 16} if args.quick else {1: 4, 4: 8, 16: 32}  # requests per level and round
    budget_s = 20.0

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model, source = model_dir(args.model, workdir)
        config = json.loads((model / "config.json").read_text())
        process, url = start_server(model, max(LEVELS), workdir)
        try:
            print(f"server {url}, model {source}", flush=True)
            asyncio.run(run_level(url, 2, 2, 8, budget_s))  # warm-up: first-call costs off the books
            runs: dict[int, list[dict]] = {clients: [] for clients in LEVELS}
            for round_ in range(rounds):  # levels alternate, so that load from elsewhere hits them alike
                for clients in LEVELS:
                    run = asyncio.run(run_level(url, clients, per_round[clients], max_tokens, budget_s))
                    runs[clients].append(run)
                    print(f"round {round_ + 1}, {clients:2d} clients: {run['tokens_per_s']:6.0f} tok/s, "
                          f"ttft p50 {run['ttft_p50_s']:.3f} s, errors {run['errors']}", flush=True)  # fmt: skip
            health = httpx.get(f"{url}/health", timeout=10).json()
        finally:
            process.terminate()
            process.wait(timeout=60)

    levels = {str(clients): summarize(clients, level_runs) for clients, level_runs in runs.items()}
    speedup = levels["16"]["tokens_per_s"] / levels["1"]["tokens_per_s"]
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_1m_at_end": os.getloadavg()[0],
        },
        "quick": args.quick,
        "model": {"source": source, **{k: config[k] for k in ("d_model", "n_layers", "n_heads", "vocab_size")}},
        "server": {"max_batch": max(LEVELS), "max_queue": 64, "transport": "HTTP/1.1 SSE over loopback"},
        "request": {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95},
        "rounds": rounds,
        "levels": levels,
        "speedup_16_vs_1": speedup,
        "health_after": health,
        "goals": {
            "tokens_per_s_16_ge_4x_1": speedup >= 4,
            "zero_errors": all(level["errors"] == 0 for level in levels.values()),
        },
    }
    atomic_write_json(RESULTS, report)
    print(json.dumps(report["goals"] | {"speedup_16_vs_1": round(speedup, 2)}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

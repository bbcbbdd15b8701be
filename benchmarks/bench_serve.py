"""Serving benchmark: writes benchmarks/results/serve.json.

Starts `tisslm serve` on loopback ports, once per decode engine (TissLM's own eager, its compiled
step in fp32 and in bf16, and llama.cpp's, `--backend llama.cpp`), and llama.cpp's own server (`llama-server`, with as
many parallel slots) when `--llama-server PATH` names one (`make llama-server` builds it). All
servers start first and every round runs 1, 8 and 32 concurrent streaming clients (httpx)
against each in turn, so that load from elsewhere hits them alike. Each client sends
completions one after another until its share of requests is done or the level's time budget
runs out. Per server and level: aggregate generated tokens/s over the level's wall time,
p50/p99 time to first token and request latency, errors. The goal: 32 clients reach at least 4x
the tokens/s of one, with no errors.

Requests ask for a fixed number of tokens (`ignore_eos`), so every level does the same work per
request whatever the model samples. The model is models/model when present (the pipeline's), else
a randomly initialised one of the default shape (d_model 128, 6 layers) with a BPE of this
project's sources: decode speed depends on the shape, not on the weights.
Usage: python benchmarks/bench_serve.py [--model DIR] [--llama-server PATH] [--quick]
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

RESULTS = Path(__file__).parent / "results" / "serve.json"
TRAINED = Path(__file__).parents[1] / "models" / "model"
PROMPTS = ["def ", "import os\n", "class Config:\n    def __init__(self", "for i in range(", "# Compute the "]
LEVELS = (1, 8, 32)
ENGINES = {
    "tisslm_torch": [],
    "tisslm_torch_compiled": ["--compile"],
    "tisslm_torch_compiled_bf16": ["--compile", "--precision", "bf16"],
    "tisslm_llama_cpp": ["--backend", "llama.cpp"],
}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def start_tisslm(model: Path, max_batch: int, options: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "tisslm.cli", "serve", "--model", str(model), "--port", "0",
               "--max-batch", str(max_batch), "--max-queue", "64", "--max-tokens", "512", *options]  # fmt: skip
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=log.parent)
    return process, wait_ready(process, log, lambda text: re.search(r"on (http://\S+)", text))


def start_llama_server(binary: Path, model: Path, slots: int, log: Path) -> tuple[subprocess.Popen, str]:
    """llama.cpp's server on the model's F16 GGUF export, `slots` parallel sequences of max_seq_len each."""
    from tisslm.core.tokenizer import load_tokenizer
    from tisslm.release.export import export_gguf

    lm = TissLM.from_pretrained(model)
    gguf = export_gguf(lm, load_tokenizer(model), log.parent / "model-F16.gguf", "F16")
    port = free_port()
    threads = str(torch.get_num_threads())
    # The binary resolved: a relative path (`make llama-server` builds one) would not survive the cwd.
    command = [str(binary.resolve()), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--parallel", str(slots),
               "--ctx-size", str(slots * lm.config.max_seq_len), "--threads", threads, "--threads-batch", threads,
               "--flash-attn", "off", "--no-webui"]  # fmt: skip
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=log.parent)
    return process, wait_ready(process, log, lambda _: f"http://127.0.0.1:{port}")  # ready when /health answers


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(process: subprocess.Popen, log: Path, address) -> str:
    deadline = time.monotonic() + 300  # a compiled engine compiles before it listens
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()}")
        found = address(log.read_text())
        if found:
            url = found if isinstance(found, str) else found.group(1)
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return url
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
    tokens = streamed = 0
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
            elif any(c.get("text") for c in chunk["choices"]):
                streamed += 1  # a server that sends no usage: one token per chunk
    end = time.perf_counter()
    return {"ttft_s": (first or end) - started, "latency_s": end - started, "tokens": tokens or streamed}


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
        return choice, "/".join(choice.resolve().parts[-2:])  # models/model, not where this machine keeps it
    if (TRAINED / "config.json").is_file():
        return TRAINED, "models/model (trained)"
    from tisslm.core.config import TokenizerParams
    from tisslm.core.tokenizer import train_bpe

    # A BPE of this project's sources: llama.cpp loads no GGUF without merges.
    sources = sorted((Path(__file__).parents[1] / "src").rglob("*.py"))
    tokenizer = train_bpe((p.read_text() for p in sources), TokenizerParams(vocab_size=8192), False)
    torch.manual_seed(0)
    out = workdir / "model"
    TissLM(ModelConfig(vocab_size=tokenizer.get_vocab_size())).save_pretrained(out, tokenizer=tokenizer)
    return out, "random init, default shape (models/model absent)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (default: models/model, else a random one)")
    parser.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary, to compare against")
    parser.add_argument("--quick", action="store_true", help="fewer requests, for a smoke run")
    args = parser.parse_args()
    max_tokens, rounds = (32, 1) if args.quick else (128, 2)
    per_round = {1: 2, 8: 8, 32: 32} if args.quick else {1: 4, 8: 16, 32: 64}  # requests per level and round
    budget_s = 30.0
    slots = max(LEVELS)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model, source = model_dir(args.model, workdir)
        config = json.loads((model / "config.json").read_text())
        servers: dict[str, tuple[subprocess.Popen, str]] = {}
        try:
            for name, options in ENGINES.items():
                servers[name] = start_tisslm(model, slots, options, workdir / f"{name}.log")
            if args.llama_server is not None:
                servers["llama_server"] = start_llama_server(args.llama_server, model, slots, workdir / "llama.log")
            for name, (_, url) in servers.items():
                print(f"{name}: {url}", flush=True)
                asyncio.run(run_level(url, 2, 2, 8, budget_s))  # warm-up: first-call costs off the books
            runs: dict[str, dict[int, list[dict]]] = {name: {clients: [] for clients in LEVELS} for name in servers}
            for round_ in range(rounds):
                for clients in LEVELS:
                    for name, (_, url) in servers.items():
                        run = asyncio.run(run_level(url, clients, per_round[clients], max_tokens, budget_s))
                        runs[name][clients].append(run)
                        print(f"round {round_ + 1}, {clients:2d} clients, {name}: {run['tokens_per_s']:6.0f} tok/s, "
                              f"ttft p50 {run['ttft_p50_s']:.3f} s, errors {run['errors']}", flush=True)  # fmt: skip
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(timeout=60)

    results = {}
    for name, server_runs in runs.items():
        levels = {str(clients): summarize(clients, level_runs) for clients, level_runs in server_runs.items()}
        results[name] = {
            "levels": levels,
            "speedup_32_vs_1": levels["32"]["tokens_per_s"] / levels["1"]["tokens_per_s"],
        }
    if "llama_server" in results:
        for name in ENGINES:
            results[name]["vs_llama_server"] = {
                clients: results[name]["levels"][clients]["tokens_per_s"]
                / results["llama_server"]["levels"][clients]["tokens_per_s"]
                for clients in map(str, LEVELS)
            }
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
        "server": {"max_batch": slots, "max_queue": 64, "transport": "HTTP/1.1 SSE over loopback"},
        "request": {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95},
        "rounds": rounds,
        "servers": results,
        "goals": {
            "tokens_per_s_32_ge_4x_1": all(r["speedup_32_vs_1"] >= 4 for n, r in results.items() if n in ENGINES),
            "zero_errors": all(lv["errors"] == 0 for r in results.values() for lv in r["levels"].values()),
        },
    }
    atomic_write_json(RESULTS, report)
    print(json.dumps(report["goals"], indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

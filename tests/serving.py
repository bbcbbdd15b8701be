"""Real `tisslm serve` processes for the serving tests: started on a free loopback port, stopped after."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
from conftest import make_model

from tisslm.core.tokenizer import byte_level_tokenizer

# Byte-level vocabulary, and a context long enough that a generation can outlast a test's steps.
SERVE_MODEL = dict(vocab_size=257, max_seq_len=4096)
STARTUP_S = 90


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    make_model(seed=seed, **SERVE_MODEL).save_pretrained(directory, tokenizer=byte_level_tokenizer())
    return directory


def save_chain_model(directory: Path, chain: str) -> Path:
    """A byte-level model that, greedy or sampled, follows `chain`: after each character the next one
    in it, after any other token the end of text. Attention and MLP write nothing, so the last
    token alone decides, and its one-hot embedding picks one row of the head. Every character
    of `chain` must have one successor (a character may repeat only if what follows it does too)."""
    import torch

    from tisslm.core.model import ModelConfig, TissLM

    tokenizer = byte_level_tokenizer()
    end = tokenizer.token_to_id("<|endoftext|>")
    successor = {}
    for a, b in itertools.pairwise(chain):
        if successor.setdefault(a, b) != b:
            raise ValueError(f"chain: {a!r} is followed by both {successor[a]!r} and {b!r}")
    config = ModelConfig(vocab_size=257, d_model=264, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                         max_seq_len=512, tie_embeddings=False)  # fmt: skip
    model = TissLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.norm.weight.fill_(1.0)
        model.tok_emb.weight[:, : config.vocab_size].copy_(torch.eye(config.vocab_size))
        for token in range(config.vocab_size):
            text = tokenizer.decode([token])
            following = successor.get(text) if len(text) == 1 else None
            target = tokenizer.encode(following).ids[0] if following is not None else end
            model.lm_head.weight[target, token] = 20.0
    model.save_pretrained(directory, tokenizer=tokenizer)
    return directory


class ServerProcess:
    """`python -m tisslm.cli serve --port 0 ...`; the address is read from its first line of output."""

    def __init__(
        self, model: str | Path, *args: str, workdir: Path, env: dict[str, str] | None = None, filtered: bool = False
    ):
        """`filtered`: with the content filter of params.yaml (workdir's, else the defaults). Off
        by default: a random model's lines are no test of the filter, and its line-at-a-time
        release would change what the streaming tests measure."""
        self.log_path = workdir / "server.log"
        self._log = self.log_path.open("w")
        command = [sys.executable, "-m", "tisslm.cli", "serve", "--model", str(model), "--port", "0", *args]
        if not filtered:
            command.append("--no-filter")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir, env={**os.environ, **(env or {})}
        )
        self.url = self._wait_until_ready()

    def _wait_until_ready(self) -> str:
        deadline = time.monotonic() + STARTUP_S
        url = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            if url is None and (found := re.search(r"on (http://\S+)", self.log())):
                url = found.group(1)
            if url is not None:
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        return url
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {STARTUP_S} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def wait_for(self, predicate, what: str, limit_s: float = 60.0) -> dict:
        """Poll /health until predicate(health) holds; fail naming `what` after limit_s."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            state = self.health()
            if predicate(state):
                return state
            time.sleep(0.05)
        raise AssertionError(f"{what}: still {self.health()} after {limit_s} s")

    def metric(self, name: str) -> float:
        """The value of one sample line of /metrics (name with its labels, as exposed)."""
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def stream_events(url: str, path: str, body: dict) -> list[dict]:
    """The JSON events of a streamed answer, in order; it must end with [DONE]."""
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# A small corpus for the knowledge-base tests: one planted function that a query about customs
# duties finds first, and a few others on unrelated topics to rank below it.
KB_CORPUS = {
    "tariffs.py": (
        "def customs_duty(value, rate):\n"
        '    """Duty owed on imported goods: their declared value times the tariff rate."""\n'
        "    return value * rate\n"
    ),
    "geometry.py": (
        "def circle_area(radius):\n"
        '    """Area of a circle of the given radius."""\n'
        "    return 3.14159 * radius * radius\n\n\n"
        "def square_perimeter(side):\n"
        '    """Perimeter of a square."""\n'
        "    return 4 * side\n"
    ),
    "weather.py": (
        "def celsius_to_fahrenheit(celsius):\n"
        '    """Convert a temperature reading from Celsius to Fahrenheit."""\n'
        "    return celsius * 9 / 5 + 32\n\n\n"
        "def rainfall_total(readings):\n"
        '    """Total rainfall over a list of daily readings, in millimetres."""\n'
        "    return sum(readings)\n"
    ),
    "inventory.py": (
        "class Shelf:\n"
        '    """Items stored on one warehouse shelf."""\n\n'
        "    def add(self, item):\n"
        "        self.items.append(item)\n\n"
        "    def count(self):\n"
        "        return len(self.items)\n"
    ),
}
KB_QUERY = "customs duty owed on imported goods"


def build_tiny_kb(directory: Path) -> Path:
    """Index KB_CORPUS (written to directory/src) into directory/kb, which it returns."""
    from tisslm.kb import build_index

    source = directory / "src"
    source.mkdir(parents=True)
    for name, text in KB_CORPUS.items():
        (source / name).write_text(text)
    build_index(directory / "kb", directory=source, include=["**/*.py"], progress=False)
    return directory / "kb"

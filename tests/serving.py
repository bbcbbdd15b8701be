"""Real `tisslm serve` processes for the serving tests: started on a free loopback port, stopped after."""

from __future__ import annotations

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


class ServerProcess:
    """`python -m tisslm.cli serve --port 0 ...`; the address is read from its first line of output."""

    def __init__(self, model: str | Path, *args: str, workdir: Path, env: dict[str, str] | None = None):
        self.log_path = workdir / "server.log"
        self._log = self.log_path.open("w")
        command = [sys.executable, "-m", "tisslm.cli", "serve", "--model", str(model), "--port", "0", *args]
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

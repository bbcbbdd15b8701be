"""Tiny models for fast tests: weights re-drawn at a scale that gives O(1) logits, so that
tolerances like atol=1e-5 are tight relative to the values compared."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tisslm.core.model import ModelConfig, TissLM

TINY = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> TissLM:
    torch.manual_seed(seed)
    model = TissLM(ModelConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3 if name == "tok_emb.weight" else 1.0 / param.size(1) ** 0.5)
            else:
                param.uniform_(0.5, 1.5)  # norm gains away from 1 so a mis-mapped one shows
    return model.to(dtype).eval()


@pytest.fixture(scope="session", autouse=True)
def _audit_key_file(tmp_path_factory):
    """Audit logs sign their heads with a key file: the tests' own, never the user's ~/.config one
    (servers and CLIs the tests start inherit it through the environment)."""
    if "TISSLM_AUDIT_KEY_FILE" not in os.environ and "TISSLM_AUDIT_KEY" not in os.environ:
        os.environ["TISSLM_AUDIT_KEY_FILE"] = str(tmp_path_factory.mktemp("audit-key") / "audit.key")
    yield


@pytest.fixture
def tiny_model() -> TissLM:
    return make_model()


REPO = Path(__file__).resolve().parents[1]
# What a copy of the project leaves behind: environments, git, and everything the stages make.
PROJECT_OUTPUTS = {".venv", ".git", "data", "models", "metrics", "plots", "reports", "dvc.lock", "mlflow.db",
                   "mlruns", "mlartifacts", ".dvc-storage", "node_modules", "dvc_plots"}  # fmt: skip


def stage_command(project: Path, stage: str) -> list[str]:
    """A stage's command line as dvc.yaml gives it, run by this interpreter."""
    import shlex
    import sys

    import yaml

    words = shlex.split(yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage]["cmd"])
    return [sys.executable, *words[1:]]  # words[0] is `python`


def free_port() -> int:
    """A loopback port nothing listens on now, for servers that cannot be given port 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, log: Path, what: str, limit_s: float = 120) -> None:
    """Poll `url` until it answers 2xx; fail with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            pass
        assert process.poll() is None, f"{what} exited: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what} did not answer {url} within {limit_s:.0f} s"
        time.sleep(0.5)


def copy_project(destination: Path) -> Path:
    """The project's code, dvc.yaml, params.yaml and .dvc config, without its outputs: a fresh workspace."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        top_level = Path(directory) == REPO
        return {n for n in names if n in ("__pycache__", "tmp") or (top_level and n in PROJECT_OUTPUTS)}

    shutil.copytree(REPO, destination, ignore=ignore)
    return destination


@pytest.fixture(scope="session")
def humaneval_problems() -> dict:
    from tisslm.agent.humaneval import load_problems

    return load_problems()


@pytest.fixture
def locked_workspace() -> Iterator[Path]:
    """A fresh directory below a 0700 mkdtemp() parent, as the evaluate stage's: uid 65534 (the
    sandbox's user when the caller is root) cannot enter it, so its launcher must hand the way in."""
    top = Path(tempfile.mkdtemp(prefix="tisslm-ws-"))
    (top / "ws").mkdir()
    yield top / "ws"
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (starting one takes about 10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A tokenizer and token shards made from a small synthetic code corpus, as the stages make them
    (the training tests' data)."""
    import random

    from synthetic import code_doc

    from tisslm.core.config import TokenizerParams
    from tisslm.core.model import TOKENIZER_FILE
    from tisslm.core.tokenizer import train_bpe
    from tisslm.data.tokens import split_documents, tokenize_corpus

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    texts = ["\n".join(code_doc(rng, n_lines=30)) for _ in range(120)]
    ids = [f"doc{i}" for i in range(len(texts))]
    # Special tokens pinned, not the defaults: the tolerances the training tests measured hold for this data.
    special = ["<|endoftext|>", "<|pad|>"]
    tokenizer = train_bpe(texts, TokenizerParams(vocab_size=320, special_tokens=special), show_progress=False)
    (root / "tokenizer").mkdir()
    tokenizer.save(str(root / "tokenizer" / TOKENIZER_FILE))
    split = split_documents(ids, texts, [False] * len(ids), 0.1)
    tokenize_corpus(split, tokenizer, root / "tokenizer" / TOKENIZER_FILE, root / "tokens", 0.1, 64, 0)
    return root


def postgres_binaries() -> Path:
    """The newest installed PostgreSQL server's bin directory (Debian's layout, else PATH)."""
    import glob

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    initdb = Path(found[-1]) if found else Path(shutil.which("initdb") or "initdb")
    assert initdb.is_file(), "PostgreSQL's server is not installed (make test installs Debian's postgresql)"
    return initdb.parent


@contextmanager
def postgres_server(user: str, password: str, prefix: str = "tisslm-pg-") -> Iterator[int]:
    """A real PostgreSQL server on a free loopback port (scram-sha-256, superuser `user`); yields the
    port, stops it after. PostgreSQL refuses to run as root, so under root it runs as Debian's
    `postgres` user."""
    import tempfile

    binaries = postgres_binaries()
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data = Path(tempfile.mkdtemp(prefix=prefix))
    password_file = data / "password"
    password_file.write_text(password + "\n")
    if as_owner:
        shutil.chown(data, "postgres", "postgres")
        shutil.chown(password_file, "postgres", "postgres")
    port = free_port()

    def run(*command: str) -> None:
        done = subprocess.run([*as_owner, *command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    run(str(binaries / "initdb"), "-D", str(data / "db"), "-U", user, "--auth=scram-sha-256",
        f"--pwfile={password_file}", "--encoding=UTF8", "--locale=C")  # fmt: skip
    run(str(binaries / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "server.log"), "-w", "-t", "60",
        "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start")  # fmt: skip
    try:
        yield port
    finally:
        run(str(binaries / "pg_ctl"), "-D", str(data / "db"), "-m", "fast", "stop")
        shutil.rmtree(data, ignore_errors=True)

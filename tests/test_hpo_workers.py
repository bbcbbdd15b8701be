"""HPO across workers, for real: two worker processes share one Optuna study in PostgreSQL (Debian's,
started here on loopback as tests/test_mlflow_stack.py starts it), one is SIGKILLed mid-trial, and
the other marks that trial failed once its heartbeat stops and runs it again with the same params.

Each worker is what `tisslm pipeline hpo` runs per trial, without the flow around it (its data stages
and MLflow runs are tests/test_pipeline.py's): `open_study` on the database URL, `run_trials`, and
trials that train a tiny model through `train` on the `corpus` fixture's tokens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import postgres_server

from tisslm.core.config import HpoParams
from tisslm.flows.hpo import STORAGE_ENV, masked, open_study, storage_of

PASSWORD = "s3cret/pw"  # a character a URL must quote: the URL below is built as a user would
HPO = {"n_trials": 6, "study_name": "workers", "trial_steps": 60, "eval_interval": 20, "startup_trials": 100,
       "heartbeat_s": 1, "max_retries": 1,
       "search_space": {"train.lr": {"low": 0.001, "high": 0.03, "log": True},
                        "train.warmup_steps": {"choices": [1, 4]}}}  # fmt: skip
TINY = {"model.vocab_size": 320, "model.d_model": 48, "model.n_layers": 2, "model.n_heads": 4,
        "model.n_kv_heads": 2, "model.d_ff": 96, "model.max_seq_len": 64, "train.seq_len": 32,
        "train.batch_size": 8, "train.eval_batches": 2, "train.log_interval": 20, "train.mlflow": False,
        "train.precision": "fp32"}  # fmt: skip
WORKER = """
import json, sys
from pathlib import Path
from tisslm.core.config import HpoParams, Params, with_updates
from tisslm.flows.hpo import open_study, run_trials, trial_params
from tisslm.train.trainer import Paths, train

corpus, scratch = Path(sys.argv[1]), Path(sys.argv[2])
hpo = HpoParams(**json.loads(sys.argv[3]))
base = with_updates(Params(), json.loads(sys.argv[4]))

def objective(trial):
    _, params = trial_params(trial, base, hpo)
    out = scratch / f"trial-{trial.number}"
    paths = Paths(tokens=corpus / "tokens", tokenizer=corpus / "tokenizer", checkpoints=out / "checkpoints",
                  model=out / "model")
    return train(params, paths)["val_bits_per_byte"]

run_trials(open_study(scratch, hpo), objective, hpo)
"""


@pytest.fixture(scope="module")
def database() -> str:
    """A PostgreSQL server on a free loopback port with a `hpo` database; its URL, password included.
    PostgreSQL refuses to run as root, so under root it runs as Debian's `postgres` user."""
    import psycopg

    with postgres_server("tisslm", PASSWORD, prefix="tisslm-hpo-pg-") as port:
        with psycopg.connect(host="127.0.0.1", port=port, user="tisslm", password=PASSWORD, dbname="postgres",
                             autocommit=True) as connection:  # fmt: skip
            connection.execute("CREATE DATABASE hpo")
        yield f"postgresql://tisslm:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/hpo"


def start_worker(corpus: Path, scratch: Path, url: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, STORAGE_ENV: url, "OMP_NUM_THREADS": "1"}  # the URL from the environment, as documented
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(corpus), str(scratch), json.dumps(HPO), json.dumps(TINY)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip


def test_the_storage_comes_from_the_environment_and_is_logged_without_its_password(monkeypatch):
    hpo = HpoParams()
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert storage_of(hpo) == "models/hpo/study.journal" == masked(storage_of(hpo))
    monkeypatch.setenv(STORAGE_ENV, "postgresql://tisslm:hunter2@db:5432/hpo")
    assert storage_of(hpo) == "postgresql://tisslm:hunter2@db:5432/hpo"
    assert masked(storage_of(hpo)) == "postgresql://tisslm:***@db:5432/hpo"


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_two_workers_share_a_study_and_a_killed_workers_trial_is_retried(corpus, database, tmp_path, monkeypatch):
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    started = time.monotonic()
    hpo = HpoParams(**HPO)
    monkeypatch.setenv(STORAGE_ENV, database)
    study = open_study(tmp_path, hpo)  # this process only watches (and creates the tables once, not racing)
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    survivor = start_worker(corpus, tmp_path / "a", database, logs[0])
    victim = start_worker(corpus, tmp_path / "b", database, logs[1])

    def trials():
        return study.get_trials(deepcopy=False)

    def running_on(worker: subprocess.Popen):
        return [
            t
            for t in trials()
            if t.state.name == "RUNNING" and t.user_attrs.get("worker", "").endswith(f":{worker.pid}")
        ]

    # Killed in its second trial, so that one of its trials finished: both workers' trials are in the study.
    deadline = time.monotonic() + 90
    while not (any(t.state.name == "COMPLETE" and t.user_attrs["worker"].endswith(f":{victim.pid}") for t in trials())
               and running_on(victim)):  # fmt: skip
        assert victim.poll() is None and survivor.poll() is None, (
            logs[1].read_text()[-3000:] + logs[0].read_text()[-3000:]
        )
        assert time.monotonic() < deadline, "the second worker never started a second trial"
        time.sleep(0.05)
    killed_number = running_on(victim)[0].number
    time.sleep(0.3)  # inside the trial's training
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert study.get_trials(deepcopy=False)[killed_number].state.name == "RUNNING"  # until its heartbeat is stale

    assert survivor.wait(timeout=120) == 0, logs[0].read_text()[-3000:]
    final = trials()
    finished = [t for t in final if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == hpo.n_trials, [(t.number, t.state.name) for t in final]
    killed = final[killed_number]
    assert killed.state.name == "FAIL" and killed.user_attrs["worker"].endswith(f":{victim.pid}")
    retries = [t for t in final if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed_number]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE", [(t.number, t.system_attrs) for t in final]
    assert retries[0].params == killed.params and retries[0].user_attrs["worker"].endswith(f":{survivor.pid}")
    workers = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in finished}
    assert workers == {str(survivor.pid), str(victim.pid)}
    assert [t.state.name for t in final].count("FAIL") == 1
    assert "s3cret" not in logs[0].read_text()
    print(f"two workers, {len(final)} trials, {time.monotonic() - started:.1f}s")

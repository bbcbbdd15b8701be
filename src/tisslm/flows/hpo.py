"""The `tisslm-hpo` flow: an Optuna study of short training runs over params.yaml's `hpo.search_space`.

Trials train in this process through the library (not DVC: they are throwaway runs in temporary
directories), on the data the pipeline's stages made, which the flow brings up to date first. The
median pruner stops a trial whose val bits/byte is worse than the median of earlier trials at the
same step. The study lives in an Optuna journal file, or in a database (`hpo.storage` a URL, or
$TISSLM_HPO_STORAGE), so a killed study resumes where it stopped: `hpo.n_trials` counts finished
trials across restarts. On a database several workers share one study: each trial heartbeats every
`hpo.heartbeat_s`, and a worker killed mid-trial leaves a trial that another (or a restarted) one
marks failed and runs again with the same params, up to `hpo.max_retries` times. Each trial is an
MLflow run nested under the flow's run. The result, metrics/hpo.json, holds the best params and the
`dvc exp run` line that applies them to the real pipeline.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import socket
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import optuna
from mlflow import MlflowClient
from prefect import flow, get_run_logger

from tisslm.core.config import Choices, FloatRange, HpoParams, Params, load_params, with_updates
from tisslm.core.errors import TissLMError
from tisslm.core.io import atomic_write_json
from tisslm.flows.pipeline import PARAMS_FILE, parent_run, project_root, run_stages, stage_arguments, stage_order
from tisslm.tracking import open_run
from tisslm.train.trainer import Paths, train

RESULT_FILE = Path("metrics/hpo.json")
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
STORAGE_ENV = "TISSLM_HPO_STORAGE"  # overrides hpo.storage: a database URL holds a password params.yaml should not


def _suggest(trial: optuna.Trial, name: str, dimension: FloatRange | Choices):
    if isinstance(dimension, Choices):
        return trial.suggest_categorical(name, dimension.choices)
    return trial.suggest_float(name, dimension.low, dimension.high, log=dimension.log)


def worker_id() -> str:
    """Each trial's `worker` user attr: the host and process that ran it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def storage_of(hpo: HpoParams) -> str:
    """$TISSLM_HPO_STORAGE if set, else `hpo.storage`: a journal file (relative to the project) or a database URL."""
    return os.environ.get(STORAGE_ENV) or hpo.storage


def is_database(storage: str) -> bool:
    return "://" in storage


def masked(storage: str) -> str:
    """The storage as it may be logged or written down: a URL's password replaced by ***."""
    if not is_database(storage):
        return storage
    from sqlalchemy.engine import make_url

    return make_url(storage).render_as_string(hide_password=True)


def _engine_url(url: str) -> str:
    """A bare postgresql:// URL means psycopg2 to SQLAlchemy; without it, psycopg (3), which the project installs."""
    scheme, _, rest = url.partition("://")
    if scheme in ("postgresql", "postgres") and importlib.util.find_spec("psycopg2") is None:
        return f"postgresql+psycopg://{rest}"
    return url


def open_study(root: Path, hpo: HpoParams) -> optuna.Study:
    """The study in its storage (`storage_of`).

    Journal file: one worker at a time; trials left running by a killed process are marked failed here.
    Database: any number of workers; a trial whose heartbeat stopped for 2 x `hpo.heartbeat_s` is
    marked failed (by whichever worker starts a trial next) and retried with the same params."""
    storage_name = storage_of(hpo)
    if is_database(storage_name):
        with warnings.catch_warnings():  # heartbeats and their retry callback are "experimental" since Optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                _engine_url(storage_name),
                heartbeat_interval=hpo.heartbeat_s,
                grace_period=2 * hpo.heartbeat_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=hpo.max_retries
                ),
            )
    else:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        journal = root / storage_name
        journal.parent.mkdir(parents=True, exist_ok=True)
        storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.create_study(
        study_name=hpo.study_name,
        storage=storage,
        load_if_exists=True,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=hpo.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=hpo.startup_trials, n_warmup_steps=hpo.warmup_steps),
    )
    if not is_database(storage_name):
        for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(stale.number, state=optuna.trial.TrialState.FAIL)
    return study


def run_trials(
    study: optuna.Study, objective: Callable[[optuna.Trial], float], hpo: HpoParams, catch: tuple = ()
) -> None:
    """Run trials until the study, counting every worker's, has `hpo.n_trials` finished (complete or
    pruned) ones. Workers running together may each finish the trial they hold when the count is
    reached: the study can end up to (workers - 1) trials over. Each trial records its `worker`."""
    remaining = hpo.n_trials - len(study.get_trials(deepcopy=False, states=FINISHED))
    if remaining <= 0:
        return

    def tagged(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker_id())
        return objective(trial)

    study.optimize(
        tagged,
        n_trials=remaining,  # this worker alone; the callback stops it when all workers together are there
        callbacks=[optuna.study.MaxTrialsCallback(hpo.n_trials, states=FINISHED)],
        catch=catch,
    )


def trial_params(trial: optuna.Trial, base: Params, hpo: HpoParams) -> tuple[dict, Params]:
    """The trial's sampled values (a retried trial's are its failed original's) and the params it trains with."""
    sampled = {name: _suggest(trial, name, dim) for name, dim in hpo.search_space.items()}
    trial_budget = {
        "train.max_steps": hpo.trial_steps, "train.eval_interval": hpo.eval_interval,
        "train.checkpoint_interval": hpo.trial_steps, "train.keep_checkpoints": 1, "train.nproc": 1,
    }  # fmt: skip
    return sampled, with_updates(base, trial_budget | sampled)


def _objective(root: Path, base: Params, hpo: HpoParams, parent_run_id: str):
    logger = get_run_logger()
    # The pipeline's train stage reads its data and tokenizer from dvc.yaml's command line; so do the trials.
    stage_paths = Paths(**stage_arguments(root, "train"))
    base = with_updates(base, {"train.mlflow": True})

    def objective(trial: optuna.Trial) -> float:
        sampled, params = trial_params(trial, base, hpo)
        run_id = open_run(f"trial-{trial.number}", parent_run_id, {"optuna.trial": str(trial.number)})
        trial.set_user_attr("mlflow_run_id", run_id)

        def report(record: dict) -> None:
            trial.report(record["val_bpb"], record["step"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"val {record['val_bpb']:.4f} bits/byte at step {record['step']}")

        state = "FAIL"
        try:
            with tempfile.TemporaryDirectory(prefix=f"trial-{trial.number}-") as scratch:
                paths = replace(
                    stage_paths, checkpoints=Path(scratch) / "checkpoints", model=Path(scratch) / "model",
                    metrics=None, loss_csv=None,
                )  # fmt: skip
                metrics = train(params, paths, on_eval=report, run_id=run_id)
            state = "COMPLETE"
            logger.info(f"trial {trial.number}: {metrics['val_bits_per_byte']:.4f} bits/byte with {sampled}")
            return metrics["val_bits_per_byte"]
        except optuna.TrialPruned as pruned:
            state = "PRUNED"
            logger.info(f"trial {trial.number}: pruned, {pruned}")
            raise
        finally:
            client = MlflowClient()
            client.set_tag(run_id, "optuna.state", state)
            client.set_terminated(run_id, RUN_STATUS[state])

    return objective


def _result(study: optuna.Study, hpo: HpoParams) -> dict:
    trials = study.get_trials(deepcopy=False)
    count = {state.name.lower(): sum(t.state == state for t in trials) for state in optuna.trial.TrialState}
    storage = masked(storage_of(hpo))
    result: dict = {"study": hpo.study_name, "storage": storage, "trials": count, "best": None, "apply": None}
    if count["complete"]:
        best = study.best_trial
        result["best"] = {"trial": best.number, "val_bits_per_byte": best.value, "params": best.params}
        result["apply"] = "dvc exp run " + " ".join(f"-S {shlex.quote(f'{k}={v}')}" for k, v in best.params.items())
    return result


@flow(name="tisslm-hpo", log_prints=True)
def tisslm_hpo(overrides: list[str] | None = None, n_trials: int | None = None) -> dict:
    """Run the study until it has `hpo.n_trials` finished trials; returns metrics/hpo.json's content.

    `overrides` (key=value) apply to the trials' params only; params.yaml is left as it is."""
    root = project_root()
    overrides = list(overrides or [])
    params = load_params(root / PARAMS_FILE, overrides)
    hpo = params.hpo.model_copy(update={"n_trials": n_trials} if n_trials else {})
    corners = {k: d.choices[0] if isinstance(d, Choices) else d.low for k, d in hpo.search_space.items()}
    with_updates(params, corners)  # an unknown or invalid key stops here, in one line
    upstream = stage_order(root, "train")[:-1]  # the data and tokenizer the trials train on
    with parent_run("hpo", root, params, {"overrides": " ".join(overrides)}) as (client, run_id):
        run_stages(upstream, root, run_id, params)
        get_run_logger().info(f"hpo: study {hpo.study_name!r} in {masked(storage_of(hpo))}, worker {worker_id()}")
        study = open_study(root, hpo)
        # A sampled combination the schema refuses fails that trial, not the study.
        run_trials(study, _objective(root, params, hpo, run_id), hpo, catch=(TissLMError,))
        result = _result(study, hpo)
        if result["best"]:
            client.log_metric(run_id, "best_val_bits_per_byte", result["best"]["val_bits_per_byte"])
            client.set_tag(run_id, "apply", result["apply"])
        atomic_write_json(root / RESULT_FILE, result)
    get_run_logger().info(f"hpo: {result['trials']}; best {result['best']}; apply with: {result['apply']}")
    return result

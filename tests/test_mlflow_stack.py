"""MLflow on its production stack, for real: a tracking server started with infra/docker-compose.yml's own
`mlflow server` arguments, over a PostgreSQL server (Debian's, started here on loopback) and an S3
object store (moto's server, in place of MinIO), both at the addresses the compose file gives
them rewritten to this machine's loopback ports. A training run's metrics and artifacts and a
registered model version land there and read back, through MLflow and straight from the stores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import free_port, postgres_server, wait_until_up
from test_infra import compose, created_buckets
from test_registry import TEXTS, save, trained
from test_train import run_training

from tisslm.core.config import RegisterParams
from tisslm.core.model import TissLM


def query(port: int, store, sql: str, parameters: tuple = (), database: str | None = None) -> list[tuple]:
    """Rows of one statement, run in autocommit (CREATE DATABASE refuses a transaction)."""
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user=store.username, password=store.password,
                         dbname=database or store.path.lstrip("/"), autocommit=True) as connection:  # fmt: skip
        cursor = connection.execute(sql, parameters)
        return cursor.fetchall() if cursor.description else []


@pytest.fixture(scope="module")
def stack_settings():
    """The compose file's settings for the mlflow service and what it connects to."""
    services = compose()["services"]
    arguments = dict(arg.partition("=")[::2] for arg in services["mlflow"]["command"][2:])
    store = urlsplit(arguments["--backend-store-uri"])
    bucket = urlsplit(arguments["--artifacts-destination"]).netloc
    assert bucket in created_buckets()
    return services, arguments, store, bucket


@pytest.fixture(scope="module")
def postgres(stack_settings):
    """A PostgreSQL server on a free loopback port, with the compose file's user, password and database.
    PostgreSQL refuses to run as root, so under root it runs as Debian's `postgres` user."""
    _, _, store, _ = stack_settings
    with postgres_server(store.username, store.password) as port:
        query(port, store, f'CREATE DATABASE "{store.path.lstrip("/")}"', database="postgres")
        yield port


@pytest.fixture(scope="module")
def object_store(tmp_path_factory, stack_settings):
    """moto's S3 server on a free loopback port, with the bucket minio-init creates."""
    import boto3

    services, _, _, bucket = stack_settings
    root = tmp_path_factory.mktemp("moto")
    port = free_port()
    log = root / "moto.log"
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/moto-api/", server, log, "moto_server")
    credentials = {k: services["mlflow"]["environment"][k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                      aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
    s3.create_bucket(Bucket=bucket)
    yield url, s3
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory, stack_settings, postgres, object_store):
    """`mlflow server` with the compose file's arguments and environment; only hosts and ports change."""
    services, arguments, store, _ = stack_settings
    s3_url, _ = object_store
    root = tmp_path_factory.mktemp("mlflow-stack")
    port = free_port()
    local = {
        "--host": "127.0.0.1",
        "--port": str(port),
        "--backend-store-uri": arguments["--backend-store-uri"].replace(f"@{store.hostname}:{store.port}/",
                                                                        f"@127.0.0.1:{postgres}/"),
    }  # fmt: skip
    command = [f"{key}={local.get(key, value)}" if value else key for key, value in arguments.items()]
    env = {**os.environ, **services["mlflow"]["environment"], "MLFLOW_S3_ENDPOINT_URL": s3_url}
    log = root / "server.log"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *command, "--workers=1"], cwd=root,
                              stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/health", server, log, "mlflow server")
    yield url
    server.terminate()
    server.wait(timeout=30)


def test_compose_settings_are_what_the_server_runs_with(stack_settings):
    """The server below is started from these: the test would not exercise the stack otherwise."""
    _, arguments, store, bucket = stack_settings
    assert store.scheme == "postgresql" and "--serve-artifacts" in arguments
    assert arguments["--artifacts-destination"] == f"s3://{bucket}"


def test_a_training_run_and_a_registered_model_land_in_postgres_and_the_object_store(
    corpus,
    tmp_path,
    monkeypatch,
    tracking_server,
    postgres,
    object_store,
    stack_settings,
):
    import mlflow
    from mlflow.tracking import MlflowClient

    _, _, store, bucket = stack_settings
    _, s3 = object_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)

    # A training run, by the project's own trainer.
    run_training(corpus, tmp_path / "run", "train.mlflow=true", "train.max_steps=6", "train.log_interval=2")
    client = MlflowClient(tracking_uri=tracking_server, registry_uri=tracking_server)
    run_id = json.loads((tmp_path / "run" / "model" / "training.json").read_text())["metrics"]["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [2, 4, 6]
    plot = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="train_loss.png", dst_path=tmp_path,
                                                    tracking_uri=tracking_server))  # fmt: skip
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The bytes are in the object store, under the run's id; the metrics are in PostgreSQL.
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    stored_plot = next(k for k in keys if run_id in k and k.endswith("train_loss.png"))
    assert s3.get_object(Bucket=bucket, Key=stored_plot)["Body"].read() == plot.read_bytes()
    steps = query(postgres, store, "SELECT step FROM metrics WHERE run_uuid = %s AND key = 'train_loss' ORDER BY step",
                  (run_id,))  # fmt: skip
    assert [row[0] for row in steps] == [2, 4, 6]

    # A model version, registered through the project's gate, reads back from the registry.
    from conftest import make_model

    from tisslm.release.registry import MODEL_NAME, register

    model = trained(make_model(vocab_size=257, max_seq_len=64), 5)
    decision = register(save(model, tmp_path / "model"), TEXTS, 32, 50.0, 0.0, RegisterParams())
    assert decision.promoted
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) == decision.challenger_version
    restored = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@champion", dst_path=tmp_path / "dl",
                                                        tracking_uri=tracking_server))  # fmt: skip
    weights = next(restored.rglob("model.safetensors"))
    reloaded = TissLM.from_pretrained(weights.parent)
    assert all((a == b).all() for a, b in zip(reloaded.state_dict().values(), model.state_dict().values(), strict=True))
    assert any(
        k.endswith("model.safetensors") for k in (o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    )
    aliases = query(
        postgres, store, "SELECT alias, version FROM registered_model_aliases WHERE name = %s", (MODEL_NAME,)
    )
    assert ("champion", int(decision.challenger_version)) in aliases

"""params.yaml validation and the `tisslm` command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, free_port

from tisslm.core.config import load_params
from tisslm.core.errors import ConfigError


def tisslm(*args: str, stdin: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tisslm.cli", *args], input=stdin, capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_load_params_applies_typed_overrides(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  d_model: 64\n  n_heads: 4\n  n_kv_heads: 4\n")
    params = load_params(path, ["model.n_layers=3", "model.tie_embeddings=false", "generate.top_k=null"])
    assert (params.model.d_model, params.model.n_layers, params.model.tie_embeddings) == (64, 3, False)
    assert params.generate.top_k is None
    assert params.model.d_ff == 384  # untouched keys keep their defaults


def test_params_yaml_states_every_knob_at_its_schema_default():
    """params.yaml is the schema's defaults written out (with comments): the pipeline run and a library
    call without a params file (load_params(None)) use the same values, and no knob is left unlisted."""
    import yaml

    from tisslm.core.config import Params

    stated = yaml.safe_load((REPO / "params.yaml").read_text())
    schema = Params().model_dump(mode="json", by_alias=True)
    assert {section: sorted(set(fields) - set(stated.get(section, {}))) for section, fields in schema.items()} == {
        section: [] for section in schema
    }  # every section and field is written out
    assert load_params(REPO / "params.yaml") == Params()


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("model:\n  n_heads: 0\n", [], "model.n_heads=0: Input should be greater than 0"),
        ("model:\n  dropout: 1.5\n", [], "model.dropout=1.5: Input should be less than 1"),
        ("model:\n  d_modle: 64\n", [], "model.d_modle: unknown key"),
        ("model: [1\n", [], "invalid YAML at line 2"),
        ("- a\n", [], "expected a mapping"),
        ("", ["generate.temperature=hot"], "generate.temperature='hot': Input should be a valid number"),
        ("", ["model.n_kv_heads=3"], "model: n_kv_heads=3 must divide n_heads=4"),
        ("", ["model"], "expected key.path=value"),
        ("model:\n  d_model: 64\n", ["model.d_model.x=1"], "model.d_model is a value"),
    ],
)
def test_invalid_params_give_one_line_naming_key_value_and_rule(tmp_path, text, overrides, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_params(path, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_invalid_params_exit_2_with_one_line(tmp_path):
    result = tisslm("init-model", "--out", str(tmp_path / "m"), "--set", "model.n_heads=0")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "model.n_heads=0" in result.stderr and "greater than 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists()


def test_cli_init_info_generate(tmp_path):
    model_dir = tmp_path / "m"
    small = [
        "--set",
        "model.d_model=32",
        "--set",
        "model.n_layers=2",
        "--set",
        "model.n_heads=4",
        "--set",
        "model.d_ff=64",
    ]
    assert tisslm("init-model", "--out", str(model_dir), *small).returncode == 0
    info = json.loads(tisslm("info", "--model", str(model_dir), "--json").stdout)
    assert info["config"]["d_model"] == 32 and info["tokenizer_vocab_size"] == 257
    assert info["parameters"] > 0 and info["files"]["model.safetensors"] > 0

    result = tisslm("generate", "--model", str(model_dir), "--prompt", "def ", "--max-new-tokens", "20", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def ") and len(result.stdout) > len("def \n")
    again = tisslm("generate", "--model", str(model_dir), "--prompt", "def ", "--max-new-tokens", "20", "--seed", "1")
    assert again.stdout == result.stdout

    piped = tisslm("generate", "--model", str(model_dir), "--prompt", "-", "--max-new-tokens", "5", stdin="class A:")
    assert piped.returncode == 0 and piped.stdout.startswith("class A:")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "generate.temperature=-1.0"),
        (["--top-p", "0"], "generate.top_p=0.0"),
        (["--max-new-tokens", "5000"], "exceeds max_seq_len"),
    ],
)
def test_cli_generate_rejects_bad_arguments(tmp_path, args, message):
    tisslm("init-model", "--out", str(tmp_path / "m"), "--set", "model.n_layers=1")
    result = tisslm("generate", "--model", str(tmp_path / "m"), "--prompt", "x", *args)
    assert result.returncode == 2 and message in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_cli_missing_model_dir(tmp_path):
    result = tisslm("info", "--model", str(tmp_path / "nowhere"))
    assert result.returncode == 2
    assert "nowhere/config.json: not found" in result.stderr


def test_pipeline_commands_outside_a_project_exit_2_with_one_line(tmp_path):
    for command in (["pipeline", "run"], ["pipeline", "hpo"], ["pipeline", "retrain"]):
        result = tisslm(*command, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "not a TissLM project (no dvc.yaml here)" in result.stderr


def test_ui_serves_the_mlflow_store_of_the_project(tmp_path):
    """`tisslm ui` starts the MLflow UI on the working directory's store; it answers over HTTP."""
    import os
    import time
    import urllib.request

    assert "no MLflow store yet" in tisslm("ui", cwd=tmp_path).stderr
    setup = "from tisslm.tracking import use_experiment; use_experiment('tisslm')"
    subprocess.run([sys.executable, "-c", setup], cwd=tmp_path, check=True, timeout=120)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    ui = subprocess.Popen(
        [sys.executable, "-m", "tisslm.cli", "ui", "--port", str(port)], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                url = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=tisslm"
                with urllib.request.urlopen(url, timeout=2) as response:
                    assert json.load(response)["experiment"]["name"] == "tisslm"
                    break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, "tisslm ui did not come up"
                time.sleep(0.5)
    finally:
        ui.terminate()
        ui.wait(timeout=30)

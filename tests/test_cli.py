"""params.yaml validation and the `tisslm` command line, run as a user runs it."""

from __future__ import annotations

import json
import os
import re
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
    bf16 = tisslm(
        "generate", "--model", str(model_dir), "--prompt", "def ", "--max-new-tokens", "8", "--precision", "bf16"
    )
    assert bf16.returncode == 0 and bf16.stdout.startswith("def "), bf16.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "generate.temperature=-1.0"),
        (["--top-p", "0"], "generate.top_p=0.0"),
        (["--max-new-tokens", "5000"], "exceeds max_seq_len"),
        (["--precision", "fp16"], "precision 'fp16': one of fp32, bf16"),
        (["--backend", "llama.cpp", "--precision", "bf16"], "apply to the torch backend"),
        (["--backend", "llama.cpp", "--compile"], "apply to the torch backend"),
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
    """`tisslm ui` starts the MLflow UI on the working directory's store; it answers over HTTP, and
    without MLflow's job runners (the project submits no jobs; tisslm.tracking.SERVER_ENVIRONMENT)."""
    import os
    import time
    import urllib.request

    import psutil

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
        processes = [" ".join(child.cmdline()) for child in psutil.Process(ui.pid).children(recursive=True)]
        assert any("uvicorn" in command for command in processes), processes
        assert not any("huey" in command for command in processes), processes
    finally:
        ui.terminate()
        ui.wait(timeout=30)


# ---- startup, help, stderr, progress, structure (issue 24) ----------------------------------------

# Modules a command must not import unless it runs what needs them (the timings are in benchmarks/bench_cli.py).
HEAVY = ("torch", "rich", "sklearn", "presidio_analyzer", "transformers", "httpx", "numpy")


def imported(*args: str, cwd=None, stdin: str | None = None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `tisslm ARGS` under `python -X importtime`; the result and the names of every module it imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tisslm.cli", *args],
        input=stdin, capture_output=True, text=True, cwd=cwd, timeout=120,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    return result, {line.rsplit("|", 1)[1].strip() for line in lines}


def test_help_and_tiss_check_import_neither_torch_nor_rich(tmp_path):
    result, modules = imported("--help")
    assert result.returncode == 0 and "Usage: " in result.stdout
    assert sorted(modules.intersection(HEAVY)) == []
    script = REPO / "examples" / "tiss" / "hello.tiss"
    result, modules = imported("tiss", "check", str(script), cwd=tmp_path)
    assert result.returncode == 0 and ": ok (" in result.stdout
    assert sorted(modules.intersection(HEAVY)) == []


def test_help_loads_no_pydantic_and_tiss_check_no_params_schema(tmp_path):
    """The params schema (pydantic's models, about 0.1 s) loads in the commands that read params.yaml."""
    result, modules = imported("--help")
    assert result.returncode == 0 and sorted(modules & {"pydantic", "yaml", "tisslm.core.config"}) == []
    result, modules = imported("tiss", "check", str(REPO / "examples" / "tiss" / "hello.tiss"), cwd=tmp_path)
    assert result.returncode == 0 and "tisslm.core.config" not in modules
    result, modules = imported("safety", "scan", "-", stdin="nothing to see", cwd=tmp_path)
    assert result.returncode == 0 and "tisslm.core.config" in modules  # the filter's policy is a param


def test_only_the_tiss_commands_load_the_tisslang_parser(tmp_path):
    """lark and TissLang's parser, checks and AST (about 45 ms) load for `tiss` commands, not for the
    others or the help."""
    tisslang = {"lark", "tisslm.agent.parser", "tisslm.agent.checks", "tisslm.agent.ast"}
    for args, stdin in ((["--help"], None), (["safety", "scan", "-"], "nothing to see")):
        result, modules = imported(*args, stdin=stdin, cwd=tmp_path)
        assert result.returncode == 0 and sorted(modules & tisslang) == [], args
    result, modules = imported("tiss", "check", str(REPO / "examples" / "tiss" / "hello.tiss"), cwd=tmp_path)
    assert result.returncode == 0 and tisslang <= modules


def test_the_package_root_loads_its_public_names_on_first_use():
    code = (
        "import sys, tisslm, tisslm.core.config\n"
        "assert 'torch' not in sys.modules, 'import tisslm imported torch'\n"
        "from tisslm import ModelConfig, TissLM, generate, load_params\n"
        "from tisslm.core.model import ModelConfig as M\n"
        "from tisslm.core.sampling import SamplingParams as S\n"
        "assert M is ModelConfig and S is tisslm.core.config.SamplingParams and 'torch' in sys.modules\n"
        "assert sorted(tisslm.__all__) == ['ModelConfig', 'TissLM', 'generate', 'load_params']\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def command_paths():
    """Every command and group of the app, as argv prefixes: [], ["generate"], ["kb", "search"], ..."""
    import typer.main

    from tisslm.cli import app

    def walk(command, path):
        yield path
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


@pytest.mark.parametrize("path", command_paths(), ids=lambda path: " ".join(path) or "tisslm")
def test_help_is_whole_plain_text(path):
    """No `[params: ...]` eaten as markup (leaving "Tokens to add ."), no `<bool>` on flags, nothing
    cut with an ellipsis at 80 columns, no line past them."""
    from typer.testing import CliRunner

    from tisslm.cli import app

    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    text = result.output
    assert re.search(r" [.,;](\s|$)", text, re.MULTILINE) is None  # punctuation after a vanished `[...]`
    assert "<bool>" not in text and "…" not in text and "╭" not in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_help_keeps_the_params_keys_and_the_whole_of_long_values():
    from typer.testing import CliRunner

    from tisslm.cli import app

    runner = CliRunner()
    generate = " ".join(runner.invoke(app, ["generate", "--help"], terminal_width=80).output.split())
    assert "Tokens to add [params: generate.max_new_tokens]." in generate
    assert "0 is greedy [params: generate.temperature]." in generate
    assert "--no-cache Recompute" in generate  # a flag takes no value
    serve = " ".join(runner.invoke(app, ["serve", "--help"], terminal_width=80).output.split())
    assert "models:/tisslm@champion." in serve and "finish_reason content_filter." in serve


def test_every_group_lives_in_its_layer_and_cli_only_mounts_it():
    import typer.main

    from tisslm import cli

    commands = typer.main.get_command(cli.app).commands
    homes = {name: commands[name].callback.__module__ for name in ("serve", "chat", "attention")}
    assert homes == dict.fromkeys(("serve", "chat", "attention"), "tisslm.serve.commands")
    source = (REPO / "src" / "tisslm" / "cli.py").read_text()
    for needle in ("DEFAULT_PARAMS", "ContentFilter(", "Watermark(", "watermark_key", "def serve(", "def chat("):
        assert needle not in source, needle


def test_project_params_reads_params_yaml_of_the_working_directory(tmp_path, monkeypatch):
    from tisslm.core.config import Params, project_params

    monkeypatch.chdir(tmp_path)
    assert project_params() == Params()
    (tmp_path / "params.yaml").write_text("generate:\n  top_k: 7\n")
    assert project_params().generate.top_k == 7
    assert project_params(overrides=["generate.top_k=3"]).generate.top_k == 3
    other = tmp_path / "other.yaml"
    other.write_text("generate:\n  top_k: 9\n")
    assert project_params(other).generate.top_k == 9


def test_generate_shows_progress_on_stderr_and_keeps_stdout(tmp_path):
    model_dir = tmp_path / "m"
    small = ["--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.d_ff=64"]
    assert tisslm("init-model", "--out", str(model_dir), *small).returncode == 0
    args = ["generate", "--model", str(model_dir), "--prompt", "def ", "--prompt", "x", "--max-new-tokens", "12"]
    plain = tisslm(*args, "--seed", "3", "--temperature", "1", "--top-k", "40")
    assert plain.returncode == 0 and plain.stderr == ""  # stderr not a terminal: no bar
    shown = tisslm(*args, "--seed", "3", "--temperature", "1", "--top-k", "40", "--progress")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == plain.stdout
    assert "generating" in shown.stderr and "tok/s" in shown.stderr and "100%" in shown.stderr
    greedy = tisslm(*args, "--temperature", "0", "--lookahead", "3", "--progress")
    assert greedy.returncode == 0 and "100%" in greedy.stderr  # speculative decoding counts accepted drafts


def test_generate_on_a_tiny_model_writes_nothing_to_stderr(tmp_path):
    """Not even from an int8 model, whose torchao import logs kernels for absent GPUs and torch's
    pytree deprecation notices (the library itself still logs them; the CLI drops them)."""
    from tisslm.core.model import TissLM
    from tisslm.core.tokenizer import load_tokenizer
    from tisslm.release.quantize import quantize_model, save_quantized

    model_dir = tmp_path / "m"
    assert tisslm("init-model", "--out", str(model_dir), "--set", "model.n_layers=1").returncode == 0
    int8 = tmp_path / "int8"
    lm = TissLM.from_pretrained(model_dir)
    save_quantized(quantize_model(lm, "int8_weight_only"), "int8_weight_only", int8, load_tokenizer(model_dir))
    for directory in (model_dir, int8):
        result = tisslm("generate", "--model", str(directory), "--prompt", "def ", "--max-new-tokens", "8")
        assert result.returncode == 0 and result.stdout.startswith("def ")
        assert result.stderr == "", directory.name


def test_loading_a_model_skips_its_random_init_and_torch_dynamo(tmp_path):
    """from_pretrained builds on the target device with the random fills skipped (not on the meta
    device, whose ops import torch._dynamo: 0.6 s of every command that loads a model)."""
    model_dir = tmp_path / "m"
    assert tisslm("init-model", "--out", str(model_dir), "--set", "model.n_layers=1").returncode == 0
    result, modules = imported("info", "--model", str(model_dir), "--json")
    assert result.returncode == 0, result.stderr
    assert "torch" in modules and "torch._dynamo" not in modules

    import torch
    from safetensors.torch import load_file

    from tisslm.core.model import TissLM

    loaded = TissLM.from_pretrained(model_dir)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in load_file(model_dir / "model.safetensors").items())
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    fresh = TissLM(loaded.config)  # a new model still gets its random init
    assert 0.015 < float(fresh.tok_emb.weight.detach().std()) < 0.025


@pytest.mark.parametrize("ran", [True, False])
def test_the_pipeline_summary_says_once_to_version_dvc_lock_when_a_stage_ran(ran, capsys):
    """The flow's log leaves out DVC's per-stage `git add dvc.lock` advice; the summary gives it, once."""
    from tisslm.cli import _summarise
    from tisslm.flows.pipeline import PipelineOutcome, StageOutcome

    decision = {"promoted": True, "reasons": ["first registered model"], "challenger_version": "1",
                "challenger_pass_at_1": 0.0}  # fmt: skip
    stages = [StageOutcome("train", ran, 1.0, "r1"), StageOutcome("export", False, 1.0, "r2")]
    _summarise(PipelineOutcome(decision, stages, "parent", 60.0))
    summary = capsys.readouterr().out
    assert f"{int(ran)} stages ran" in summary and "promoted to champion" in summary
    assert summary.count("git add dvc.lock") == int(ran)


TRACKED_RUN = """
import mlflow

from tisslm.core.config import load_params
from tisslm.core.errors import run_main
from tisslm.tracking import Tracker


def main():
    Tracker.start(load_params(None))  # what the train stage opens: a run that logs system metrics
    mlflow.end_run()
    print("done")


run_main(main)
"""


def test_a_tracked_run_under_an_entry_point_writes_nothing_to_stderr(tmp_path):
    """MLflow's system-metrics monitor said at INFO that it skipped GPUs, started, stopped and
    terminated: four lines in every train stage's log that nobody can act on."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    runs = [
        subprocess.run([sys.executable, "-c", TRACKED_RUN], capture_output=True, text=True, env=env, timeout=120)
        for _ in range(2)
    ]
    assert all(run.returncode == 0 and run.stdout == "done\n" for run in runs), runs[0].stderr
    assert "Creating initial MLflow database tables" in runs[0].stderr  # a new store: said once, and kept
    assert runs[1].stderr == ""

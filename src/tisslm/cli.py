"""The `tisslm` command line.

Every command reports a user's mistake (a bad value, a missing or corrupt file) as one line on
stderr with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tisslm.agent.commands import app as tiss_app
from tisslm.core.errors import TissLMError, run_main
from tisslm.kb.commands import app as kb_app
from tisslm.safety.commands import app as audit_app
from tisslm.safety.commands import safety_app, watermark_app
from tisslm.serve import commands as serve_commands
from tisslm.serve.commands import AdapterDir, ModelDir, ParamsFile, load_model

if TYPE_CHECKING:
    from tisslm.safety.filters import Verdict

# Startup: this module and the command modules it mounts import only typer and the params schema;
# each command imports torch, the model, the filter's classifier, ... when it runs. Help is plain
# click text (rich_markup_mode=None): `[params: key]` stays as written, flags show no `<bool>`,
# and nothing imports rich.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"max_content_width": 100},
    help="TissLM: train, evaluate, quantize, export and serve a small language model.",
)

Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", help="Override a parameter: key.sub=value (repeatable)."),
]


@app.command()
def generate(
    model: ModelDir,
    prompt: Annotated[
        list[str], typer.Option("--prompt", metavar="TEXT", help="Prompt text, or - to read stdin. Repeat for a batch.")
    ],
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens to add [params: generate.max_new_tokens].")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 is greedy [params: generate.temperature].")] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely [params: generate.top_k].")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus mass [params: generate.top_p].")] = None,
    seed: Annotated[int | None, typer.Option(help="Fix the sampled tokens [params: generate.seed].")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute the whole sequence every step.")] = False,
    backend: Annotated[
        str, typer.Option(help="Decode engine: torch, or llama.cpp (the `llama` extra; faster on a CPU).")
    ] = "torch",
    compile: Annotated[
        bool, typer.Option("--compile", help="torch: compile the decode step first (seconds, cached).")
    ] = False,
    precision: Annotated[
        str | None,
        typer.Option(help="torch: fp32 or bf16 weights and activations (bf16: faster compiled where native)."),
    ] = None,
    lookahead: Annotated[
        int, typer.Option(help="Speculative decoding: tokens drafted by prompt lookup per step (greedy only).")
    ] = 0,
    kb: Annotated[
        Path | None,
        typer.Option("--kb", help="Knowledge base (tisslm kb build): ground each prompt in retrieved chunks."),
    ] = None,
    kb_k: Annotated[int, typer.Option("--kb-k", help="Chunks to retrieve per prompt (with --kb).")] = 4,
    watermark: Annotated[
        bool | None,
        typer.Option(
            "--watermark/--no-watermark",
            help="Watermark the continuation [params: safety.watermark.enabled]; "
            "the key is TISSLM_WATERMARK_KEY, else safety.watermark.key.",
        ),
    ] = None,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="Show a progress bar of the tokens generated, on stderr [default: when stderr is a terminal].",
        ),
    ] = None,
    params: ParamsFile = None,
    adapter: AdapterDir = None,
) -> None:
    """Continue one or more prompts and print prompt + continuation.

    With --kb, chunks retrieved for each prompt go before it (most relevant last) within the
    model's context, and their sources are listed on stderr. With --watermark, `tisslm watermark
    detect` can later tell the continuation came from a model holding the key. On a terminal, a
    progress bar of the tokens generated (and their rate) shows on stderr; stdout holds only the
    text."""
    from tisslm.core.config import project_params
    from tisslm.core.decode import for_decoding
    from tisslm.core.generate import complete
    from tisslm.core.tokenizer import load_tokenizer
    from tisslm.release.llamacpp import decode_engine
    from tisslm.safety.filters import ContentFilter
    from tisslm.safety.watermark import Watermark

    given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    config = project_params(params, [f"generate.{k}={v}" for k, v in given.items() if v is not None])
    settings = config.generate
    texts = [sys.stdin.read() if p == "-" else p for p in prompt]
    if backend == "llama.cpp" and (compile or precision is not None):
        raise TissLMError(
            "--compile and --precision apply to the torch backend; llama.cpp decodes its GGUF export as exported"
        )
    lm, tokenizer = load_model(model, adapter), load_tokenizer(model)
    if precision is not None:  # else as stored: a quantized model keeps its own dtype
        lm = for_decoding(lm, precision)
    inputs = (
        texts if kb is None else _grounded(kb, kb_k, texts, tokenizer, lm.config.max_seq_len - settings.max_new_tokens)
    )
    processor = Watermark.from_params(config, tokenizer.get_vocab_size(), enabled=watermark)
    decoder = decode_engine(backend, lm, tokenizer, len(inputs))
    with _token_progress(settings.max_new_tokens * len(inputs), progress) as on_tokens:
        completions = complete(
            lm,
            tokenizer,
            inputs,
            settings,
            processor,
            use_cache=not no_cache,
            compile=compile,
            lookahead=lookahead,
            decoder=decoder,
            on_tokens=on_tokens,
        )
    content_filter = ContentFilter.from_params(config)
    for i, (text, completion) in enumerate(zip(texts, completions, strict=True)):
        if i:
            typer.echo("-" * 40)
        verdict = content_filter.apply(completion)
        typer.echo(text + verdict.text)
        _report_filter(verdict)


@contextmanager
def _token_progress(total: int, show: bool | None) -> Iterator[Callable[[int], None] | None]:
    """A tqdm bar on stderr counting generated tokens (None: only when stderr is a terminal); yields
    its update hook, or None when hidden. A batch whose rows all stop early ends the bar where it is."""
    if not (sys.stderr.isatty() if show is None else show) or total == 0:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc="generating", unit="tok", file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar.update
        if bar.n < total:  # stopped at <|endoftext|>: the bar says how many came, at 100%
            bar.total = bar.n
            bar.refresh()


def _report_filter(verdict: Verdict) -> None:
    """What the content filter did to an output, on stderr (stdout keeps only the text)."""
    decisions = ", ".join(f"{d['category']} {d['action']} x{d['count']}" for d in verdict.decisions())
    if verdict.blocked:
        typer.echo(f"[content filter: output ended before blocked content; {decisions}]", err=True)
    elif decisions:
        typer.echo(f"[content filter: {decisions}]", err=True)


def _grounded(kb_dir: Path, k: int, texts: list[str], tokenizer, budget_tokens: int) -> list[str]:
    """Each text with its retrieved context before it; the sources go to stderr, the text stays on stdout."""
    from tisslm.kb import KnowledgeBase
    from tisslm.kb.context import with_context

    grounded = []
    with KnowledgeBase.open(kb_dir) as kb:
        if warning := kb.grounding_warning():  # the pipeline measured grounding as worse than none
            typer.echo(f"warning: {warning}", err=True)
        for number, text in enumerate(texts, start=1):
            result = with_context(text, kb.search(text, k=k), tokenizer, budget_tokens)
            typer.echo(f"sources of prompt {number}:" + ("" if result.sources else " none"), err=True)
            for hit in result.sources:
                typer.echo(f"  {hit.path}:{hit.start_line}-{hit.end_line} {hit.name} ({hit.score:.3f})", err=True)
            if result.truncated:
                typer.echo("  (context truncated to fit the model's context)", err=True)
            grounded.append(result.text)
    return grounded


def _describe(model_dir: Path) -> dict:
    from tisslm.core.tokenizer import load_tokenizer

    lm = load_model(model_dir)
    files = {p.name: p.stat().st_size for p in sorted(model_dir.iterdir()) if p.is_file()}
    tokenizer = load_tokenizer(model_dir) if "tokenizer.json" in files else None
    return {
        "model": str(model_dir),
        "parameters": lm.num_parameters(),
        "non_embedding_parameters": lm.num_parameters(exclude_embeddings=True),
        "dtype": str(next(lm.parameters()).dtype).removeprefix("torch."),
        "bytes_on_disk": sum(files.values()),
        "files": files,
        "tokenizer_vocab_size": tokenizer.get_vocab_size() if tokenizer else None,
        "config": lm.config.model_dump(),
    }


@app.command()
def info(
    model: ModelDir,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show a model's configuration, parameter count and size."""
    facts = _describe(model)
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    typer.echo(f"model       {facts['model']}")
    typer.echo(
        f"parameters  {facts['parameters'] / 1e6:.2f}M ({facts['non_embedding_parameters'] / 1e6:.2f}M non-embedding)"
    )
    typer.echo(f"weights     {facts['dtype']}, {facts['bytes_on_disk'] / 1e6:.1f} MB on disk")
    typer.echo(f"tokenizer   {facts['tokenizer_vocab_size'] or 'none'} tokens")
    typer.echo("config      " + " ".join(f"{k}={v}" for k, v in facts["config"].items()))


@app.command("init-model")
def init_model(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the model to (replaced atomically).")],
    overrides: Overrides = None,
    params: ParamsFile = None,
    seed: Annotated[int, typer.Option(help="Seed of the random initialisation.")] = 0,
) -> None:
    """Write a randomly initialised model with a byte-level tokenizer (for tests and demos)."""
    import torch

    from tisslm.core.config import project_params
    from tisslm.core.model import TissLM
    from tisslm.core.tokenizer import byte_level_tokenizer

    config = project_params(params, overrides or []).model
    torch.manual_seed(seed)
    TissLM(config).save_pretrained(out, tokenizer=byte_level_tokenizer())
    typer.echo(f"wrote {out}")


@app.command("import")
def import_command(
    source: Annotated[
        Path,
        typer.Option(
            "--from",
            help="Local Hugging Face Llama, Mistral or Qwen2 checkpoint (config.json, safetensors, tokenizer.json).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the TissLM model to (replaced atomically).")],
) -> None:
    """Import a local Hugging Face Llama, Mistral or Qwen2 checkpoint as a TissLM model directory.

    Only what TissLM's model represents exactly imports: a Llama-style network with SiLU, plain
    RoPE (no scaling), no o_proj or MLP biases; Qwen2's q/k/v biases are kept. A sliding window
    shorter than the context becomes max_seq_len (within it, it is exactly full attention).
    Weights are read from safetensors only; a pickled pytorch_model.bin is refused, never loaded.
    The chat template, if any, is kept as chat_template.jinja, and tokenizer_config.json (which
    names its bos and eos tokens) is copied. Continue pretraining from the
    result with train.init_from."""
    from tisslm.release.hf import import_llama

    import_llama(source, out)
    typer.echo(f"wrote {out}")


@app.command("train")
def train_command(
    tokens: Annotated[Path, typer.Option(help="Token directory (train.bin, val.bin, meta.json).")],
    tokenizer: Annotated[Path, typer.Option(help="Directory holding tokenizer.json.")],
    checkpoints: Annotated[Path, typer.Option(help="Checkpoint directory; training resumes from its newest.")],
    out: Annotated[Path, typer.Option("--out", help="Where the final model goes.")],
    metrics: Annotated[Path | None, typer.Option(help="Write the final metrics JSON here.")] = None,
    overrides: Overrides = None,
    params: ParamsFile = None,
) -> None:
    """Train (or resume) a model; with more than one process (train.nproc), relaunch under torchrun."""
    from tisslm.core.config import project_params
    from tisslm.train.launch import launch
    from tisslm.train.trainer import Paths

    paths = Paths(tokens=tokens, tokenizer=tokenizer, checkpoints=checkpoints, model=out, metrics=metrics)
    argv = ["-m", "tisslm.cli", *sys.argv[1:]]
    result = launch(project_params(params, overrides or []), paths, argv)
    if result:
        typer.echo(f"val bits/byte {result['val_bits_per_byte']:.3f}; model in {out}")


# ---- TissLang: `tiss check|plan|run` (the agent's workflow language, RUN in a bubblewrap sandbox) ----

app.add_typer(tiss_app, name="tiss")

# ---- knowledge base: `kb build|search|stats` (SQLite FTS5 + dense vectors, fused) ----

app.add_typer(kb_app, name="kb")

# ---- audit log: `audit verify` (the hash chain of `serve --audit-log`) ----

app.add_typer(audit_app, name="audit")

# ---- watermark: `watermark detect` (the z-test of Kirchenbauer et al. 2023 on a text) ----

app.add_typer(watermark_app, name="watermark")

# ---- content filter: `safety scan` (what the filter finds in a text, and what the policy does) ----

app.add_typer(safety_app, name="safety")


# ---- orchestration: `pipeline run|hpo|retrain` (Prefect flows over the DVC stages) and `ui` ----

pipeline_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Run the DVC stages as Prefect flows, with MLflow runs and the registry's decision.",
)
app.add_typer(pipeline_app, name="pipeline")
# Offline defaults for the orchestration stack; a user's own settings win.
QUIET_TELEMETRY = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "ITERATIVE_DO_NOT_TRACK": "1",
}


def _project_root() -> Path:
    """The flows run the DVC project in the working directory, with offline defaults for their stack."""
    root = Path.cwd()
    if not (root / "dvc.yaml").is_file():
        raise TissLMError(f"{root}: not a TissLM project (no dvc.yaml here); cd to the project root")
    for key, value in QUIET_TELEMETRY.items():
        os.environ.setdefault(key, value)
    return root


def _summarise(outcome) -> None:
    from tisslm.tracking import tracking_uri

    ran = sum(s.ran for s in outcome.stages)
    typer.echo(
        f"\nPipeline done in {outcome.seconds / 60:.1f} min: {ran} stages ran, {len(outcome.stages) - ran} up to date"
    )
    for stage in outcome.stages:
        typer.echo(f"  {stage.stage:<15} {'ran' if stage.ran else 'up to date':<11} {stage.seconds:7.1f} s")
    from tisslm.release.registry import verdict

    decision = outcome.decision
    typer.echo(
        f"""
Results:
  model          models/model/   try: tisslm generate --model models/model --prompt 'def '
  model card     models/MODEL_CARD.md, models/DATASHEET.md
  metrics        metrics/*.json (dvc metrics show); loss curve plots/train_loss.csv (dvc plots show)
  exports        models/export/ (Hugging Face, ONNX, GGUF), models/quantized/ (int8 schemes that pay here)
  data report    reports/data_docs/index.html (Great Expectations)
  HumanEval      pass@1 {decision["challenger_pass_at_1"]:.1%} (greedy, sandboxed; the rest in metrics/eval.json)
  registry       tisslm version {decision["challenger_version"]} {verdict(decision)}
                 {"; ".join(decision["reasons"])}
  MLflow         run {outcome.mlflow_run_id} in {tracking_uri()}
                 open it with: tisslm ui   (then http://127.0.0.1:5000)"""
    )
    if ran:
        typer.echo("  versioning     git add dvc.lock: it names the data, params and code that made these results")


@pipeline_app.command("run")
def pipeline_run(overrides: Overrides = None) -> None:
    """Run every dvc.yaml stage in order as a Prefect flow.

    --set values are checked, then written to params.yaml first, as `dvc exp run -S` does."""
    _project_root()
    from tisslm.flows.pipeline import tisslm_pipeline

    _summarise(tisslm_pipeline(overrides or []))


@pipeline_app.command("retrain")
def pipeline_retrain(overrides: Overrides = None) -> None:
    """dvc pull, the pipeline, dvc push: what CI and the nightly deployment run."""
    _project_root()
    from tisslm.flows.pipeline import tisslm_retrain

    _summarise(tisslm_retrain(overrides or []))


@pipeline_app.command("hpo")
def pipeline_hpo(
    overrides: Overrides = None,
    trials: Annotated[int | None, typer.Option(help="Finished trials to reach [params: hpo.n_trials].")] = None,
) -> None:
    """Search hyperparameters with an Optuna study of short training runs.

    The best params go to metrics/hpo.json; --set values apply to the trials only."""
    _project_root()
    from tisslm.flows.hpo import tisslm_hpo

    result = tisslm_hpo(overrides or [], trials)
    typer.echo(f"\ntrials: {result['trials']}")
    if result["best"]:
        best = result["best"]
        typer.echo(f"best: trial {best['trial']}, {best['val_bits_per_byte']:.4f} val bits/byte with {best['params']}")
        typer.echo(f"apply to the pipeline with:\n  {result['apply']}")
    typer.echo("full result: metrics/hpo.json")


@app.command()
def ui(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 5000,
) -> None:
    """The MLflow UI on the project's store (MLFLOW_TRACKING_URI, else ./mlflow.db)."""
    from tisslm.tracking import SERVER_ENVIRONMENT, tracking_uri

    uri = tracking_uri()
    if not uri.startswith("sqlite:"):
        typer.echo(f"MLflow is served at {uri}: open that in a browser")
        return
    if not Path(uri.removeprefix("sqlite:///")).is_file():
        raise TissLMError(f"{uri}: no MLflow store yet; run the pipeline first (make run)")
    typer.echo(f"MLflow UI for {uri} on http://{host}:{port} (Ctrl-C stops it)")
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    os.execve(sys.executable, command, {**SERVER_ENVIRONMENT, **os.environ})  # a user's own settings win


# ---- serving: `serve`, `chat`, `attention` (tisslm.serve.commands; their modules load only when one runs) ----

for command in serve_commands.COMMANDS:
    app.command()(command)


def main() -> None:
    run_main(app)


if __name__ == "__main__":
    main()

"""The `tisslm` command line.

Every command reports a user's mistake (a bad value, a missing or corrupt file) as one line on
stderr with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer

from tisslm.agent.commands import app as tiss_app
from tisslm.core.config import DEFAULT_PARAMS, Params, load_params
from tisslm.core.errors import TissLMError, run_main
from tisslm.core.generate import complete
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import byte_level_tokenizer, load_tokenizer
from tisslm.kb.commands import app as kb_app
from tisslm.safety.commands import app as audit_app
from tisslm.safety.commands import safety_app, watermark_app
from tisslm.safety.filters import ContentFilter, Verdict
from tisslm.safety.watermark import Watermark, watermark_key

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="TissLM: train, evaluate, quantize, export and serve a small language model.",
)

ModelDir = Annotated[
    Path, typer.Option("--model", help="Model directory (config.json, model.safetensors, tokenizer.json).")
]
ParamsFile = Annotated[
    Path | None, typer.Option("--params", help="params.yaml to read (default: ./params.yaml if present).")
]
Overrides = Annotated[list[str] | None, typer.Option("--set", help="Override a parameter: key.sub=value (repeatable).")]


def _params(path: Path | None, overrides: list[str]) -> Params:
    if path is None and DEFAULT_PARAMS.is_file():
        path = DEFAULT_PARAMS
    return load_params(path, overrides)


def _load_model(directory: Path) -> TissLM:
    """A model directory as the stages write them: full precision (models/model) or int8 (models/quantized/*)."""
    from tisslm.release.quantize import RECIPE_FILE, load_quantized

    return load_quantized(directory) if (directory / RECIPE_FILE).is_file() else TissLM.from_pretrained(directory)


@app.command()
def generate(
    model: ModelDir,
    prompt: Annotated[list[str], typer.Option("--prompt", help="Prompt text, or - to read stdin. Repeat for a batch.")],
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
    params: ParamsFile = None,
) -> None:
    """Continue one or more prompts and print prompt + continuation.

    With --kb, chunks retrieved for each prompt go before it (most relevant last) within the
    model's context, and their sources are listed on stderr. With --watermark, `tisslm watermark
    detect` can later tell the continuation came from a model holding the key."""
    given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    config = _params(params, [f"generate.{k}={v}" for k, v in given.items() if v is not None])
    settings = config.generate
    texts = [sys.stdin.read() if p == "-" else p for p in prompt]
    lm, tokenizer = _load_model(model), load_tokenizer(model)
    inputs = (
        texts if kb is None else _grounded(kb, kb_k, texts, tokenizer, lm.config.max_seq_len - settings.max_new_tokens)
    )
    marks = config.safety.watermark
    use_watermark = marks.enabled if watermark is None else watermark
    processor = Watermark(watermark_key(marks), marks, tokenizer.get_vocab_size()) if use_watermark else None
    from tisslm.release.llamacpp import decode_engine

    decoder = decode_engine(backend, lm, tokenizer, len(inputs))
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
    )
    content_filter = ContentFilter(config.safety.filters, config.clean.anonymize)
    for i, (text, completion) in enumerate(zip(texts, completions, strict=True)):
        if i:
            typer.echo("-" * 40)
        verdict = content_filter.apply(completion)
        typer.echo(text + verdict.text)
        _report_filter(verdict)


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
    lm = _load_model(model_dir)
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
    config = _params(params, overrides or []).model
    torch.manual_seed(seed)
    TissLM(config).save_pretrained(out, tokenizer=byte_level_tokenizer())
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
    from tisslm.train.launch import launch
    from tisslm.train.trainer import Paths

    paths = Paths(tokens=tokens, tokenizer=tokenizer, checkpoints=checkpoints, model=out, metrics=metrics)
    argv = ["-m", "tisslm.cli", *sys.argv[1:]]
    result = launch(_params(params, overrides or []), paths, argv)
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
    no_args_is_help=True, help="Run the DVC stages as Prefect flows, with MLflow runs and the registry's decision."
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
  registry       tisslm version {decision["challenger_version"]} {verdict(decision)}
                 {"; ".join(decision["reasons"])}
  MLflow         run {outcome.mlflow_run_id} in {tracking_uri()}
                 open it with: tisslm ui   (then http://127.0.0.1:5000)"""
    )


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
    from tisslm.tracking import tracking_uri

    uri = tracking_uri()
    if not uri.startswith("sqlite:"):
        typer.echo(f"MLflow is served at {uri}: open that in a browser")
        return
    if not Path(uri.removeprefix("sqlite:///")).is_file():
        raise TissLMError(f"{uri}: no MLflow store yet; run the pipeline first (make run)")
    typer.echo(f"MLflow UI for {uri} on http://{host}:{port} (Ctrl-C stops it)")
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    os.execv(sys.executable, command)


# ---- serving: `serve`, `chat`, `attention` (their modules load only when one runs) ----


@app.command()
def serve(
    model: Annotated[str, typer.Option("--model", help="Model directory, or registered: models:/tisslm@champion.")],
    host: Annotated[str | None, typer.Option(help="Address to listen on (params: serve.host).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port, 0 for any free one (serve.port).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Model id clients name (serve.model_name).")] = None,
    max_batch: Annotated[int | None, typer.Option(help="Sequences decoded together (serve.max_batch).")] = None,
    backend: Annotated[str | None, typer.Option(help="Decode engine: torch or llama.cpp (serve.backend).")] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="Compile the decode step at start (serve.compile).")
    ] = None,
    lookahead: Annotated[
        int | None, typer.Option(help="Tokens drafted per step for a lone greedy request (serve.lookahead).")
    ] = None,
    max_queue: Annotated[int | None, typer.Option(help="Requests that may wait (serve.max_queue).")] = None,
    max_prompt_tokens: Annotated[int | None, typer.Option(help="Longest prompt (serve.max_prompt_tokens).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Cap on max_tokens (serve.max_tokens).")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds per request (serve.request_timeout_s).")] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help="Request body cap (serve.max_body_bytes).")] = None,
    kb: Annotated[
        Path | None,
        typer.Option("--kb", help="Knowledge base (tisslm kb build): POST /v1/retrieve, grounded completions."),
    ] = None,
    api_key: Annotated[
        list[str] | None,
        typer.Option("--api-key", help="Require `Authorization: Bearer KEY` on /v1/ routes (repeatable)."),
    ] = None,
    api_keys_file: Annotated[
        Path | None, typer.Option("--api-keys-file", help="API keys, one per line (# comments).")
    ] = None,
    audit_log: Annotated[
        Path | None, typer.Option("--audit-log", help="Append a hash-chained record of each /v1/ request (JSONL).")
    ] = None,
    audit_text: Annotated[
        bool, typer.Option("--audit-text", help="Store the prompt and output text in the audit log, not only hashes.")
    ] = False,
    no_filter: Annotated[
        bool, typer.Option("--no-filter", help="Serve without the content filter (safety.filters.policy).")
    ] = False,
    watermark: Annotated[
        bool | None,
        typer.Option(
            "--watermark/--no-watermark",
            help="Watermark every sampled token [safety.watermark.enabled]; key: TISSLM_WATERMARK_KEY, else params.",
        ),
    ] = None,
    params: ParamsFile = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with a web page at /.

    Defaults in parentheses are keys of params.yaml. With --kb, a completion or chat request may
    ask for `retrieve` to have its prompt grounded in the knowledge base, and cite its sources.
    With --api-key or --api-keys-file, /v1/ routes answer 401 without a key (/health, /metrics, the
    page and /docs stay open; the page asks for the key). With --audit-log, each /v1/ request is
    recorded (hashes, not text, unless --audit-text); `tisslm audit verify FILE` checks the chain.
    Prompts and outputs go through the content filter of safety.filters.policy unless --no-filter:
    a blocked prompt is refused (400), a blocked output ends with finish_reason content_filter.
    """
    from tisslm.core.config import ServeParams
    from tisslm.core.errors import parse
    from tisslm.serve.access import read_keys_file
    from tisslm.serve.server import serve as run_server

    given = {
        "host": host,
        "port": port,
        "model_name": name,
        "max_batch": max_batch,
        "backend": backend,
        "compile": compile,
        "lookahead": lookahead,
        "max_queue": max_queue,
        "max_prompt_tokens": max_prompt_tokens,
        "max_tokens": max_tokens,
        "request_timeout_s": timeout,
        "max_body_bytes": max_body_bytes,
    }
    config = _params(params, [])
    settings = parse(
        ServeParams, config.serve.model_dump() | {k: v for k, v in given.items() if v is not None}, "tisslm serve"
    )
    keys = [*(api_key or []), *(read_keys_file(api_keys_file) if api_keys_file is not None else [])]
    if audit_text and audit_log is None:
        raise TissLMError("--audit-text needs --audit-log FILE")
    content_filter = None if no_filter else ContentFilter(config.safety.filters, config.clean.anonymize)
    marks = config.safety.watermark
    key = watermark_key(marks) if (marks.enabled if watermark is None else watermark) else None
    run_server(
        model, settings, kb_dir=kb, api_keys=keys, audit_log=audit_log, audit_text=audit_text,
        content_filter=content_filter, watermark=marks if key is not None else None, watermark_key=key,
    )  # fmt: skip


@app.command()
def chat(
    model: ModelDir,
    system: Annotated[str | None, typer.Option(help="A system message opening the conversation.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Reply length cap (generate.max_new_tokens).")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 is greedy (generate.temperature).")] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely (generate.top_k).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus mass (generate.top_p).")] = None,
    seed: Annotated[int | None, typer.Option(help="Fix the sampled tokens (generate.seed).")] = None,
    params: ParamsFile = None,
) -> None:
    """Chat with a model in the terminal; replies stream token by token (/reset, /exit)."""
    from tisslm.serve.terminal import chat_session

    given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    config = _params(params, [f"generate.{k}={v}" for k, v in given.items() if v is not None])
    settings = config.generate
    lm = _load_model(model)
    tokenizer = load_tokenizer(model)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    typer.echo(f"chatting with {model} (/reset forgets, /exit or Ctrl-D leaves)")
    content_filter = ContentFilter(config.safety.filters, config.clean.anonymize)
    chat_session(lm, tokenizer, settings, system, read=input, write=write, content_filter=content_filter)


@app.command()
def attention(
    model: ModelDir,
    text: Annotated[str, typer.Option(help="A short text (at most serve.attention_max_tokens tokens).")],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")] = Path("attn.png"),
    params: ParamsFile = None,
) -> None:
    """Save the attention weights of every layer and head over a short text as a PNG grid."""
    from tisslm.serve.attention import attention_for_text, save_attention_png

    limit = _params(params, []).serve.attention_max_tokens
    lm = _load_model(model)
    maps = attention_for_text(lm, load_tokenizer(model), text, limit)
    save_attention_png(maps, out, title=f"{model.name}: {len(maps.tokens)} tokens")
    typer.echo(f"wrote {out}")


def main() -> None:
    run_main(app)


if __name__ == "__main__":
    main()

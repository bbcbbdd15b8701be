"""The `tisslm` command line.

Every command reports a user's mistake (a bad value, a missing or corrupt file) as one line on
stderr with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer

from tisslm.config import DEFAULT_PARAMS, Params, load_params
from tisslm.errors import run_main
from tisslm.generate import generate as generate_tokens
from tisslm.model import TissLM
from tisslm.tokenizer import END_OF_TEXT, byte_level_tokenizer, load_tokenizer

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
    params: ParamsFile = None,
) -> None:
    """Continue one or more prompts and print prompt + continuation."""
    given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    settings = _params(params, [f"generate.{k}={v}" for k, v in given.items() if v is not None]).generate
    texts = [sys.stdin.read() if p == "-" else p for p in prompt]
    lm = TissLM.from_pretrained(model)
    tokenizer = load_tokenizer(model)
    prompts = [tokenizer.encode(text).ids for text in texts]
    stop = tokenizer.token_to_id(END_OF_TEXT)
    outputs = generate_tokens(
        lm,
        prompts,
        settings.max_new_tokens,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        seed=settings.seed,
        use_cache=not no_cache,
        stop_tokens=() if stop is None else (stop,),
        vocab_limit=tokenizer.get_vocab_size(),
    )
    for i, (text, new_ids) in enumerate(zip(texts, outputs, strict=True)):
        if i:
            typer.echo("-" * 40)
        typer.echo(text + tokenizer.decode(new_ids))


def _describe(model_dir: Path) -> dict:
    lm = TissLM.from_pretrained(model_dir)
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
    """Train (or resume) a model; with train.nproc > 1, relaunch under torchrun."""
    from tisslm.train.launch import launch
    from tisslm.train.trainer import Paths

    paths = Paths(tokens=tokens, tokenizer=tokenizer, checkpoints=checkpoints, model=out, metrics=metrics)
    argv = ["-m", "tisslm.cli", *sys.argv[1:]]
    result = launch(_params(params, overrides or []), paths, argv)
    if result:
        typer.echo(f"val bits/byte {result['val_bits_per_byte']:.3f}; model in {out}")


def main() -> None:
    run_main(app)


if __name__ == "__main__":
    main()

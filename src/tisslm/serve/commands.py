"""`tisslm serve`, `tisslm chat`, `tisslm attention`: the serving layer's commands, which `tisslm.cli` mounts.

Each command imports what it runs when it runs (the server, torch, the filter's classifier), so
that `tisslm --help` and the other commands do not pay for them. The params, the content filter
and the watermark are built once here, whole, and handed down: `project_params`,
`ContentFilter.from_params`, `Watermark.from_params`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tisslm.core.errors import TissLMError

if TYPE_CHECKING:
    from tisslm.core.model import TissLM

ModelDir = Annotated[
    Path, typer.Option("--model", help="Model directory (config.json, model.safetensors, tokenizer.json).")
]
ParamsFile = Annotated[
    Path | None, typer.Option("--params", help="params.yaml to read (default: ./params.yaml if present).")
]


def load_model(directory: Path, adapter: Path | None = None) -> TissLM:
    """A model directory as the stages write them: full precision (models/model) or int8 (models/quantized/*);
    with `adapter`, a LoRA adapter directory (peft format) merged into the full-precision model at load."""
    from tisslm.core.model import TissLM
    from tisslm.release.quantize import RECIPE_FILE, load_quantized

    if adapter is not None:
        from tisslm.train.lora import load_with_adapter

        return load_with_adapter(directory, adapter)
    return load_quantized(directory) if (directory / RECIPE_FILE).is_file() else TissLM.from_pretrained(directory)


# A LoRA adapter (adapter_config.json + adapter_model.safetensors, e.g. models/sft/adapter) for the model.
AdapterDir = Annotated[
    Path | None, typer.Option("--adapter", help="LoRA adapter directory (peft format), merged into the model at load.")
]


def serve(
    model: Annotated[str, typer.Option("--model", help="Model directory, or registered: models:/tisslm@champion.")],
    host: Annotated[str | None, typer.Option(help="Address to listen on [params: serve.host].")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port, 0 for any free one [params: serve.port].")] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Model id clients name [params: serve.model_name].")
    ] = None,
    max_batch: Annotated[int | None, typer.Option(help="Sequences decoded together [params: serve.max_batch].")] = None,
    backend: Annotated[
        str | None, typer.Option(help="Decode engine: torch or llama.cpp [params: serve.backend].")
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option("--compile/--no-compile", help="Compile the decode step at start [params: serve.compile]."),
    ] = None,
    precision: Annotated[
        str | None, typer.Option(help="torch backend: fp32 or bf16 weights and activations [params: serve.precision].")
    ] = None,
    lookahead: Annotated[
        int | None, typer.Option(help="Tokens drafted per step for a lone greedy request [params: serve.lookahead].")
    ] = None,
    max_queue: Annotated[int | None, typer.Option(help="Requests that may wait [params: serve.max_queue].")] = None,
    max_prompt_tokens: Annotated[
        int | None, typer.Option(help="Longest prompt [params: serve.max_prompt_tokens].")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Cap on max_tokens [params: serve.max_tokens].")] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds per request [params: serve.request_timeout_s].")
    ] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help="Request body cap [params: serve.max_body_bytes].")] = None,
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
            help="Watermark every sampled token [params: safety.watermark.enabled]; "
            "key: TISSLM_WATERMARK_KEY, else params.",
        ),
    ] = None,
    params: ParamsFile = None,
    adapter: AdapterDir = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with a web page at /.

    Defaults in brackets are keys of params.yaml. With --kb, a completion or chat request may ask
    for `retrieve` to have its prompt grounded in the knowledge base, and cite its sources.

    With --api-key or --api-keys-file, /v1/ routes answer 401 without a key (/health, /metrics,
    the page and /docs stay open; the page asks for the key). With --audit-log, each /v1/ request
    is recorded (hashes, not text, unless --audit-text); `tisslm audit verify FILE` checks the
    chain.

    Prompts and outputs go through the content filter of safety.filters.policy unless
    --no-filter: a blocked prompt is refused (400), a blocked output ends with finish_reason
    content_filter.
    """
    from tisslm.core.config import ServeParams, project_params
    from tisslm.core.errors import parse
    from tisslm.core.tokenizer import load_tokenizer
    from tisslm.safety.filters import ContentFilter
    from tisslm.safety.watermark import Watermark
    from tisslm.serve.access import read_keys_file
    from tisslm.serve.server import serve as run_server
    from tisslm.serve.source import resolve_model_dir

    given = {
        "host": host,
        "port": port,
        "model_name": name,
        "max_batch": max_batch,
        "backend": backend,
        "compile": compile,
        "precision": precision,
        "lookahead": lookahead,
        "max_queue": max_queue,
        "max_prompt_tokens": max_prompt_tokens,
        "max_tokens": max_tokens,
        "request_timeout_s": timeout,
        "max_body_bytes": max_body_bytes,
    }
    config = project_params(params)
    settings = parse(
        ServeParams, config.serve.model_dump() | {k: v for k, v in given.items() if v is not None}, "tisslm serve"
    )
    keys = [*(api_key or []), *(read_keys_file(api_keys_file) if api_keys_file is not None else [])]
    if audit_text and audit_log is None:
        raise TissLMError("--audit-text needs --audit-log FILE")
    content_filter = None if no_filter else ContentFilter.from_params(config)
    model_dir = resolve_model_dir(model)
    marks = Watermark.from_params(config, load_tokenizer(model_dir).get_vocab_size(), enabled=watermark)
    run_server(
        model_dir, settings, kb_dir=kb, api_keys=keys, audit_log=audit_log, audit_text=audit_text,
        content_filter=content_filter, watermark=marks, adapter=adapter,
    )  # fmt: skip


def chat(
    model: ModelDir,
    system: Annotated[str | None, typer.Option(help="A system message opening the conversation.")] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Reply length cap [params: generate.max_new_tokens].")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="0 is greedy [params: generate.temperature].")] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely [params: generate.top_k].")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus mass [params: generate.top_p].")] = None,
    seed: Annotated[int | None, typer.Option(help="Fix the sampled tokens [params: generate.seed].")] = None,
    params: ParamsFile = None,
    adapter: AdapterDir = None,
) -> None:
    """Chat with a model in the terminal; replies stream token by token (/reset, /exit).

    Conversations are formatted by the model's chat template (its chat_template.jinja, else ChatML),
    as the server's chat route formats them."""
    from tisslm.core.chat import ChatTemplate
    from tisslm.core.config import project_params
    from tisslm.core.tokenizer import load_tokenizer
    from tisslm.safety.filters import ContentFilter
    from tisslm.serve.terminal import chat_session

    given = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    config = project_params(params, [f"generate.{k}={v}" for k, v in given.items() if v is not None])
    lm = load_model(model, adapter)
    tokenizer = load_tokenizer(model)
    template = ChatTemplate.load(model)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    typer.echo(f"chatting with {model} (/reset forgets, /exit or Ctrl-D leaves)")
    content_filter = ContentFilter.from_params(config)
    chat_session(
        lm, tokenizer, config.generate, system, read=input, write=write, content_filter=content_filter,
        template=template,
    )  # fmt: skip


def attention(
    model: ModelDir,
    text: Annotated[str, typer.Option(help="A short text (at most serve.attention_max_tokens tokens).")],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")] = Path("attn.png"),
    params: ParamsFile = None,
) -> None:
    """Save the attention weights of every layer and head over a short text as a PNG grid."""
    from tisslm.core.config import project_params
    from tisslm.core.tokenizer import load_tokenizer
    from tisslm.serve.attention import attention_for_text, save_attention_png

    limit = project_params(params).serve.attention_max_tokens
    lm = load_model(model)
    maps = attention_for_text(lm, load_tokenizer(model), text, limit)
    save_attention_png(maps, out, title=f"{model.name}: {len(maps.tokens)} tokens")
    typer.echo(f"wrote {out}")


COMMANDS = (serve, chat, attention)  # mounted as top-level commands by tisslm.cli, in this order

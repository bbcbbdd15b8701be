"""`tisslm serve`: open the knowledge base, load the model, start the engine, listen.

The socket is bound here, before uvicorn starts, so that a port in use is a one-line error
(exit 2) and port 0 can report the port it got. The knowledge base (`--kb`) is opened first, and
searched once, so that a missing or corrupt index, or an embedding model that cannot load, is a
one-line error before anything else is loaded or the port opens. So is an audit log (`--audit-log`)
whose last record is not intact: the server continues an existing log's chain. Listening beyond
loopback without an API key prints a warning. The content filter loads its classifier and
recognizers before the port opens too; the watermark key is never printed.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from tisslm.core.chat import ChatTemplate
from tisslm.core.config import ServeParams
from tisslm.core.decode import for_decoding
from tisslm.core.errors import TissLMError
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import load_tokenizer
from tisslm.kb import KnowledgeBase
from tisslm.release.llamacpp import decode_engine
from tisslm.safety.audit import AuditLog
from tisslm.safety.filters import ContentFilter
from tisslm.safety.watermark import Watermark
from tisslm.serve.access import check_keys, is_loopback
from tisslm.serve.batching import Batcher
from tisslm.serve.source import resolve_model_dir

# A card number and an IBAN: the filter's first look loads the toxicity classifier and the detectors' patterns.
WARM_UP = "warm up: 4111 1111 1111 1111, DE89 3704 0044 0532 0130 00"


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        # proto IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off only on sockets that say
        # so, and with it on, every small SSE chunk waits some 40 ms for the client's delayed ACK.
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        raise TissLMError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def open_knowledge_base(directory: Path) -> KnowledgeBase:
    """The index in `directory`, searched once: the embedding model loads now, not on the first request."""
    kb = KnowledgeBase.open(directory)
    if warning := kb.grounding_warning():
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    try:
        kb.search("warm up", k=1)
    except BaseException:
        kb.close()
        raise
    return kb


def serve(
    model_spec: str | Path,
    settings: ServeParams,
    kb_dir: Path | None = None,
    api_keys: Sequence[str] = (),
    audit_log: Path | None = None,
    audit_text: bool = False,
    content_filter: ContentFilter | None = None,
    watermark: Watermark | None = None,
    adapter: Path | None = None,
) -> None:
    """Serve `model_spec` (a directory, or models:/NAME@ALIAS) until interrupted; with `adapter`, a
    LoRA adapter directory merged into it at load. The content filter
    and the watermark come built (`ContentFilter.from_params`, `Watermark.from_params`); None: off."""
    import uvicorn

    from tisslm.serve.app import create_app

    api_keys = check_keys(api_keys)
    audit = AuditLog(audit_log, store_text=audit_text) if audit_log is not None else None
    kb = None
    try:
        kb = open_knowledge_base(kb_dir) if kb_dir is not None else None
        model_dir = resolve_model_dir(str(model_spec))
        if adapter is not None:
            from tisslm.train.lora import load_with_adapter

            model = load_with_adapter(model_dir, adapter)
        else:
            model = TissLM.from_pretrained(model_dir).eval()
        if settings.backend == "torch":
            model = for_decoding(model, settings.precision)
        tokenizer = load_tokenizer(model_dir)
        chat_template = ChatTemplate.load(model_dir)  # a bad template fails here, not on a request
        engine = Batcher(
            model,
            settings.max_batch,
            settings.max_queue,
            vocab_limit=tokenizer.get_vocab_size(),
            compile=settings.compile,
            lookahead=settings.lookahead,
            decoder=decode_engine(settings.backend, model, tokenizer, settings.max_batch),
        )
        sock = bind(settings.host, settings.port)  # before the filter's imports, which may write warnings
        if content_filter is not None:
            content_filter.apply(WARM_UP)  # load the classifier and the recognizers now, not on a request
        if watermark is not None and watermark.vocab_size != tokenizer.get_vocab_size():
            raise TissLMError(
                f"the watermark is for a vocabulary of {watermark.vocab_size} tokens, "
                f"the model's tokenizer has {tokenizer.get_vocab_size()}"
            )
        marks = watermark
        app = create_app(
            engine,
            tokenizer,
            settings,
            kb,
            api_keys=api_keys,
            audit=audit,
            content_filter=content_filter,
            watermark=marks,
            chat_template=chat_template,
        )
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        with_kb = f" with the knowledge base {kb_dir}" if kb_dir is not None else ""
        print(f"serving {model_dir} as {settings.model_name!r}{with_kb} on http://{shown}:{port}", flush=True)
        if not api_keys and not is_loopback(host):
            print(f"warning: listening on {shown}, beyond this machine, without an API key (see --api-key)", flush=True)
        if api_keys:
            print(f"/v1/ routes need one of {len(api_keys)} API key(s)", flush=True)
        if content_filter is not None and content_filter.active:
            print(f"content filter: {', '.join(f'{c} {a}' for c, a in content_filter.policy.items())}", flush=True)
        if marks is not None:
            print("watermarking every sampled token (tisslm watermark detect tests a text)", flush=True)
        if audit is not None:
            text = ", with the text" if audit_text else ""
            print(f"audit log {audit_log}{text}, continuing after seq {audit.seq}", flush=True)
        config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5, access_log=False)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if kb is not None:
            kb.close()
        if audit is not None:
            audit.close()

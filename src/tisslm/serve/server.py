"""`tisslm serve`: load the model, start the engine, listen.

The socket is bound here, before uvicorn starts, so that a port in use is a one-line error
(exit 2) and port 0 can report the port it got.
"""

from __future__ import annotations

import socket

from tisslm.core.config import ServeParams
from tisslm.core.errors import TissLMError
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import load_tokenizer
from tisslm.serve.engine import Engine
from tisslm.serve.source import resolve_model_dir


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


def serve(model_spec: str, settings: ServeParams) -> None:
    import uvicorn

    from tisslm.serve.app import create_app

    model_dir = resolve_model_dir(model_spec)
    model = TissLM.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    engine = Engine(model, settings.max_batch, settings.max_queue, vocab_limit=tokenizer.get_vocab_size())
    app = create_app(engine, tokenizer, settings)
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {model_dir} as {settings.model_name!r} on http://{shown}:{port}", flush=True)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5, access_log=False)
    uvicorn.Server(config).run(sockets=[sock])

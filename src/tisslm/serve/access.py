"""API keys: `tisslm serve --api-key KEY` (repeatable) or `--api-keys-file FILE`, as vLLM and llama.cpp's server take them.

With keys, every /v1/ route answers 401 (an OpenAI-style error, `WWW-Authenticate: Bearer`) unless
the request carries `Authorization: Bearer KEY` with one of them, compared in constant time against
each. /health, /metrics, the page (/) and /openapi.json and /docs stay open; the page asks for the
key in a field of its own (kept in the tab's sessionStorage) and sends it with its /v1 calls.

A key is never logged nor written to the audit log: what is recorded is its id, the first 8 hex
digits of its SHA-256 (`key_id`), which the middleware leaves in the request's state.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from collections.abc import Sequence
from pathlib import Path

from tisslm.core.errors import TissLMError

PROTECTED_PREFIX = "/v1/"
UNAUTHORIZED = {
    "error": {
        "message": "missing or invalid API key: send `Authorization: Bearer KEY`",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}


def key_id(key: str) -> str:
    """What the logs record of a key: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


def read_keys_file(path: Path) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise TissLMError(f"--api-keys-file {path}: cannot read it: {getattr(err, 'strerror', None) or err}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise TissLMError(f"--api-keys-file {path}: no keys in it")
    return keys


def check_keys(keys: Sequence[str]) -> list[str]:
    for key in keys:
        if not key or any(c.isspace() for c in key):
            raise TissLMError("an API key must be non-empty and have no spaces")
    return list(keys)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Authenticator:
    """ASGI middleware: /v1/ requests need `Authorization: Bearer KEY` with one of `keys` (none: all pass)."""

    def __init__(self, app, keys: Sequence[str]):
        self.app = app
        self.keys = [(key.encode("utf-8"), key_id(key)) for key in keys]

    def match(self, header: bytes | None) -> str | None:
        """The id of the key the header carries, or None; every key is compared, each in constant time."""
        if header is None or header[:7].lower() != b"bearer ":
            return None
        given = header[7:].strip()
        found = None
        for key, ident in self.keys:
            if hmac.compare_digest(given, key):
                found = ident
        return found

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.keys or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization")
        ident = self.match(header)
        if ident is None:
            body = json.dumps(UNAUTHORIZED).encode("utf-8")
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer"),
            ]
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})["key_id"] = ident
        await self.app(scope, receive, send)

"""The audit log of a server started with `--audit-log FILE`: one hash-chained record per /v1/ request.

`AuditTrail`, an ASGI middleware outside the API key check, opens a record for each /v1/ request;
the routes `note` on it what they learn (the parsed body, the generation job), and when the
response has gone out the middleware appends the record to the `tisslm.safety.audit.AuditLog`:
time, client address, method and route, HTTP status, the key's id (never the key), the request's
parameters less its text, SHA-256 of the prompt and of the output (as sent, after the filter),
token counts and `decisions`: what the content filter did to the prompt and to each choice's
output (category, action, count). The text itself is kept only with `--audit-text`.
/health, /metrics, the page and the OpenAPI document are not audited.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from tisslm.safety.audit import AuditLog, sha256_text
from tisslm.serve.metrics import StatusWatch

AUDITED_PREFIX = "/v1/"
# The body fields that hold text (the prompt, the conversation, the query), left out of `params`.
TEXT_FIELDS: dict[str, Any] = {"prompt": True, "messages": True, "text": True, "query": True, "retrieve": {"query"}}
STATE_KEY = "audit"


def note(request: Request, **facts: Any) -> None:
    """Add facts to the request's audit record, if it has one (the server keeps an audit log)."""
    record = request.scope.get("state", {}).get(STATE_KEY)
    if record is not None:
        record.update(facts)


def as_text(value: Any) -> str | None:
    """A prompt or output as one text: a string as is, anything else as JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def request_text(body: BaseModel) -> str | None:
    """What the client asked in words: the prompt(s), the messages, the text or the query."""
    for name in ("prompt", "messages", "text", "query"):
        value = getattr(body, name, None)
        if value is not None:
            if isinstance(value, list) and value and isinstance(value[0], BaseModel):
                value = [item.model_dump(mode="json") for item in value]
            return as_text(value)
    return None


class AuditTrail:
    """ASGI middleware writing one audit record per /v1/ request once its response is complete."""

    def __init__(self, app, log: AuditLog):
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(AUDITED_PREFIX):
            await self.app(scope, receive, send)
            return
        facts: dict[str, Any] = {}
        state = scope.setdefault("state", {})
        state[STATE_KEY] = facts
        started, watch = time.time(), StatusWatch(send)
        try:
            await self.app(scope, receive, watch)
        finally:
            record = self.record(scope, facts, started, watch.status)
            await run_in_threadpool(self.log.append, record)

    @staticmethod
    def record(scope, facts: dict[str, Any], started: float, status: int) -> dict[str, Any]:
        client = scope.get("client")
        body: BaseModel | None = facts.get("body")
        job = facts.get("job")
        prompt = request_text(body) if body is not None else None
        output = None
        prompt_tokens = completion_tokens = None
        decisions = [{"on": "prompt", **d} for d in facts.get("prompt_filter", [])]
        if job is not None:
            for index, choice in enumerate(job.filter_results()):
                decisions += [{"on": "output", "choice": index, **d} for d in choice]
            output = as_text(job.outputs[0] if len(job.outputs) == 1 else job.outputs)
            usage = job.usage()
            prompt_tokens, completion_tokens = usage.prompt_tokens, usage.completion_tokens
        return {
            "time": round(started, 3),
            "client": f"{client[0]}:{client[1]}" if client else None,
            "method": scope["method"],
            "route": scope["path"],
            "status": status,
            "key_id": scope.get("state", {}).get("key_id"),
            "params": body.model_dump(mode="json", exclude=TEXT_FIELDS, exclude_none=True) if body else None,
            "prompt_sha256": sha256_text(prompt),
            "output_sha256": sha256_text(output),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "decisions": decisions,
            "prompt": prompt,  # dropped by the log unless it stores text
            "output": output,
        }

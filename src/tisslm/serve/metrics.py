"""Prometheus metrics of one server, in a registry of its own, and the middleware that counts its requests.

A registry per app (not prometheus_client's global one) lets several servers live in one process,
as tests start them, without their counters colliding or leaking into each other's /metrics.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServeMetrics:
    """Requests, tokens, queue depth and latencies; the engine and the HTTP layer both record here."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tisslm_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.request_latency = Histogram(
            "tisslm_request_latency_seconds", "HTTP request latency to the last byte", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "tisslm_time_to_first_token_seconds", "Arrival to first generated token, queueing included",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("tisslm_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("tisslm_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter(
            "tisslm_generations_finished", "Generations ended, by reason (stop, length, cancelled, timeout, error)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "tisslm_requests_rejected", "Generations refused because the queue was full", registry=r
        )
        self.queue_depth = Gauge("tisslm_queue_depth", "Generations waiting for a KV cache slot", registry=r)
        self.active = Gauge("tisslm_active_sequences", "Generations holding a KV cache slot", registry=r)
        self.step_latency = Histogram(
            "tisslm_decode_step_seconds",
            "One batched decode forward and its sampling",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "tisslm_decode_batch_size", "Sequences advanced by one decode step", buckets=BATCH_BUCKETS, registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StatusWatch:
    """An ASGI `send` that remembers the response status (500 until one is sent), for middleware
    that records every request, failed ones included."""

    def __init__(self, send):
        self.status, self._send = 500, send

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)


class RequestMetrics:
    """ASGI middleware counting requests by route and status, and timing them to their last byte.

    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer the streams through
    a task of its own; this one only watches the messages go by. Paths outside `routes` count as
    "other", so that clients probing random paths cannot grow the metrics without bound.
    """

    def __init__(self, app, metrics: ServeMetrics, routes: Collection[str]):
        self.app, self.metrics, self.routes = app, metrics, frozenset(routes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        route = scope["path"] if scope["path"] in self.routes else "other"
        watch = StatusWatch(send)
        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.requests.labels(route, str(watch.status)).inc()
            self.metrics.request_latency.labels(route).observe(time.perf_counter() - started)

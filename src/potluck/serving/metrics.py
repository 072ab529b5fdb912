"""Prometheus metrics of one app, in a registry of its own (two apps in one process do not collide).

    curl -s localhost:8080/metrics | grep potluck_
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """HTTP requests by route and status, their latency, and the size of each model run."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("potluck_http_requests", "HTTP requests by route, method and status code",
                                ["route", "method", "code"], registry=r)
        self.latency = Histogram("potluck_http_request_duration_seconds", "time from request to response",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.texts = Counter("potluck_texts", "texts classified", ["model"], registry=r)
        self.batch_texts = Histogram("potluck_batch_texts", "texts per model run (after gathering requests)",
                                     ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_tokens = Histogram("potluck_batch_padded_tokens", "padded tokens per model run", ["model"],
                                      buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768), registry=r)
        self.batch_seconds = Histogram("potluck_batch_duration_seconds", "time of one model run", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("potluck_requests_in_flight", "requests being answered", registry=r)

    def observe_batch(self, model: str, texts: int, tokens: int, seconds: float) -> None:
        self.texts.labels(model).inc(texts)
        self.batch_texts.labels(model).observe(texts)
        self.batch_tokens.labels(model).observe(tokens)
        self.batch_seconds.labels(model).observe(seconds)


class MetricsMiddleware:
    """Pure ASGI middleware counting every HTTP request by its route template and status code."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, scope["method"], str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

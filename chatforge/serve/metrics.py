"""What the server tells its operator: Prometheus metrics (`GET /metrics`) and the access log.

`SchedulerMetrics` is fed by the scheduler thread (first tokens, generated tokens, how each
generation ended) and reads the scheduler's load when scraped (queue, running rows, KV cache use),
in a registry of its own per server, so two servers in one process (the tests) count apart.
`AccessLog` is the outermost middleware: one line per request on the `chatforge.access` logger with
the client, method, path, status, latency and the caller's user name (never the key).

`/metrics` stands behind the same Host allow-list as every route; on a server with keys it also
needs an admin's key (401 without a key, 403 with a user's), because its counters describe everyone's
traffic. Prometheus sends the key with `authorization: {credentials_file: FILE}` in its scrape
config. A server without keys listens on loopback only, and there anyone local may read it.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from chatforge.serve.auth import NOBODY, USER_SCOPE_KEY
from chatforge.serve.protocol import APIError

TOKEN_RATE_WINDOW_S = 10.0  # tokens/s is averaged over this many seconds
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
access_log = logging.getLogger("chatforge.access")


class SchedulerMetrics:
    """Counters and a histogram the scheduler thread updates; gauges read from `load()` at scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram(
            "chatforge_time_to_first_token_seconds",
            "From a request's arrival in the queue to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "chatforge_generated_tokens", "Tokens generated, all requests together", registry=self.registry
        )
        self.generations = Counter(
            "chatforge_generations",
            "Generations (one per answer) by how they ended: stop, length, cancelled or error",
            ["finish_reason"],
            registry=self.registry,
        )
        self.http = Counter(
            "chatforge_http_requests", "HTTP requests by status code", ["code"], registry=self.registry
        )
        self.recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def generated(self, n: int) -> None:
        now = time.monotonic()
        self.tokens.inc(n)
        self.recent.append((now, n))
        while self.recent and self.recent[0][0] < now - TOKEN_RATE_WINDOW_S:
            self.recent.popleft()

    def finished(self, reason: str) -> None:
        self.generations.labels(finish_reason=reason).inc()

    def tokens_per_second(self) -> float:
        since = time.monotonic() - TOKEN_RATE_WINDOW_S
        return sum(n for t, n in list(self.recent) if t >= since) / TOKEN_RATE_WINDOW_S

    def watch(self, load: Callable[[], dict]) -> None:
        """Report the gauges `load()` (Scheduler.load) gives at each scrape."""
        self.registry.register(_LoadCollector(load, self.tokens_per_second))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _LoadCollector:
    """Gauges read at scrape time: queue, running rows, KV cache use, recent tokens/s."""

    def __init__(self, load: Callable[[], dict], rate: Callable[[], float]) -> None:
        self.load, self.rate = load, rate

    def describe(self) -> list:
        return []  # read only when scraped (no values at registration)

    def collect(self):
        now = self.load()
        kv = now["kv_cache"]
        yield GaugeMetricFamily("chatforge_queue_length", "Requests waiting for a row", now["waiting"])
        yield GaugeMetricFamily("chatforge_running_rows", "Sequences generating now", now["active"])
        yield GaugeMetricFamily("chatforge_max_rows", "Sequences that may generate together", now["max_batch"])
        for key, what in (
            ("used_tokens", "Tokens the running sequences hold in the KV cache"),
            ("reserved_tokens", "KV cache slots the running sequences may come to need"),
            ("allocated_tokens", "KV cache slots allocated now"),
            ("budget_tokens", "KV cache slots the server may allocate (--kv-cache-mb / --kv-cache-tokens)"),
        ):
            yield GaugeMetricFamily(f"chatforge_kv_cache_{key}", what, kv[key])
        yield GaugeMetricFamily(
            "chatforge_generated_tokens_per_second",
            f"Tokens generated per second over the last {TOKEN_RATE_WINDOW_S:g} s",
            self.rate(),
        )


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    srv = request.app.state.server
    if srv.keys_required:
        user = request.scope.get(USER_SCOPE_KEY, NOBODY)
        if user is NOBODY:
            raise APIError(401, "You didn't provide an API key (Authorization: Bearer KEY).", code="invalid_api_key")
        if not user.admin:
            raise APIError(403, "/metrics needs an admin's key.", code="forbidden")
    return Response(srv.scheduler.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def _printable(text: str) -> str:
    """Text for one log line: control characters (a newline in a URL) escaped, never written raw."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


class AccessLog:
    """ASGI middleware, outermost: one log line per HTTP request once its response has ended
    (a stream's latency is its whole length), and the status counted for /metrics."""

    def __init__(self, app, *, metrics: SchedulerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 0

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            ms = (time.perf_counter() - t0) * 1000
            user = scope.get(USER_SCOPE_KEY, NOBODY).name or "-"  # Guard puts the caller here
            client = scope.get("client") or ("-", 0)
            self.metrics.http.labels(code=str(status or "none")).inc()
            access_log.info(
                '%s "%s %s" %s %.1fms user=%s',
                client[0],
                scope["method"],
                _printable(scope["path"]),
                status or "-",
                ms,
                _printable(user),
            )

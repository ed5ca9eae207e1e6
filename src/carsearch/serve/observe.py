"""Operations: Prometheus metrics, a request id on every response and log line, JSON logs.

`Observe` is an ASGI middleware: it gives each request an id (the client's X-Request-ID when it is a
short token, else a new one), puts it in a context variable that a logging filter copies into every
record logged while the request runs, returns it in the X-Request-ID header, counts the request and times
it by route template and status, and logs one access line. Metrics live in a registry per app, so that
several apps in one process (the tests) do not share counters.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("carsearch_request_id", default="-")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
access_log = logging.getLogger("carsearch.serve.access")


class Metrics:
    """The server's metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "carsearch_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "carsearch_request_seconds",
            "Request latency by route",
            ["route"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.batch_size = Histogram(
            "carsearch_batch_size",
            "Images per forward pass",
            registry=r,
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
        )
        self.queue_wait = Histogram(
            "carsearch_queue_wait_seconds",
            "Time a query waited for its forward pass to start",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
        )
        self.images = Gauge("carsearch_index_images", "Images in the served index", registry=r)
        self.writes = Counter("carsearch_index_writes", "Index changes by kind", ["kind"], registry=r)

    def batch(self, size: int, waited: float) -> None:
        self.batch_size.observe(size)
        self.queue_wait.observe(waited)


class Observe:
    """ASGI middleware: request id, metrics, access log."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SAFE_ID.match(given) else uuid.uuid4().hex[:16]
        token = REQUEST_ID.set(rid)
        t0 = time.perf_counter()
        status = 500

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - t0
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            access_log.info(
                "%s %s %d %.1f ms",
                scope["method"],
                scope["path"],
                status,
                seconds * 1000,
                extra={"route": route, "status": status, "ms": round(seconds * 1000, 2)},
            )
            REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Copies the running request's id into every record (`-` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, and any `extra` fields."""

    BASE = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
        "message",
        "asctime",
        "request_id",
    }

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        out.update({k: v for k, v in vars(record).items() if k not in self.BASE})
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_server_logging(log_format: str, level: int = logging.INFO) -> None:
    """Every handler of the root logger gets the request id; `json` switches them to JSON lines."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level)
    for handler in root.handlers:
        handler.addFilter(RequestIdFilter())
        handler.setFormatter(
            JsonFormatter() if log_format == "json" else logging.Formatter("%(message)s [%(request_id)s]")
        )
    logging.getLogger("carsearch").setLevel(level)

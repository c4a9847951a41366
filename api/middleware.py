"""ASGI middleware: a request-body size guard and per-route request metrics."""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import BodyTooLarge
from store import logcontext

access_log = logging.getLogger("promptstore.access")

#: Room for the non-file multipart fields and part headers around an upload.
FORM_OVERHEAD_BYTES = 1024 * 1024


class BodyLimitMiddleware:
    """Answers 413 before reading a body whose Content-Length is over the limit,
    and stops a streamed (chunked) body as soon as it passes the limit."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:
                    await _send_json(send, 413, f"request body is {declared} bytes, over the limit of {limit} bytes")
                    return
                break
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)


async def _send_json(send: Send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


class HttpMetrics:
    """Request counters and latency per route template and method, in a registry of the app's own."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "promptstore_http_requests_total",
            "HTTP requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "promptstore_http_request_duration_seconds",
            "HTTP request latency by route template and method.",
            ["route", "method"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]
        given = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-request-id"), None)
        request_id = logcontext.new_request_id(given)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            # Every log line of this request carries its id (and the tenant/task ids that
            # the dependencies add); the response says it in X-Request-ID.
            with logcontext.bind(request_id=request_id):
                try:
                    await self.app(scope, receive, send_wrapper)
                finally:
                    _access_log(scope, status[0], time.perf_counter() - start)
        finally:
            route = _route_template(scope)
            method = scope.get("method", "GET")
            self.metrics.requests.labels(route, method, str(status[0])).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - start)


#: Routes polled by machines (probes, scrapes, the docs' assets): logged at DEBUG unless they fail.
_ROUTINE_PATHS = ("/healthz", "/readyz", "/metrics", "/docs-assets/", "/admin/static/", "/admin/api/")


def _access_log(scope: dict[str, Any], status: int, seconds: float) -> None:
    """One line per request, inside the request's log context (so that JSON logs carry its
    request, tenant and task ids); replaces uvicorn's access log. Probes, metric scrapes,
    static assets and the dashboard's live polling go at DEBUG while they succeed."""
    method, path = scope.get("method", "GET"), scope.get("path", "")
    routine = status < 400 and path.startswith(_ROUTINE_PATHS)
    access_log.log(
        logging.DEBUG if routine else logging.INFO,
        "%s %s %d %.1fms", method, path, status, 1000 * seconds,
        extra={"http": {"method": method, "path": path, "route": _route_template(scope), "status": status,
                        "duration_ms": round(1000 * seconds, 2)}},
    )


def _route_template(scope: dict[str, Any]) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    # Unmatched paths share one label so that scanners cannot blow up the label set.
    return path if isinstance(path, str) else "<unmatched>"

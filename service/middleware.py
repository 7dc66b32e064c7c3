"""ASGI middleware: request-body limits enforced while the body streams in, and per-endpoint metrics."""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import LimitExceeded, error_response
from .metrics import Metrics


class BodyLimit:
    """Refuses a body over its path's limit: at once from Content-Length, else as soon as the stream passes it."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str, str], tuple[int, str]]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, name = self.limit_for(scope["method"], scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await error_response(400, "bad_request", "Content-Length is not a number")(scope, receive, send)
            if int(declared) > limit:
                message = f"request body is {int(declared)} bytes; the limit is {name}={limit}"
                return await error_response(413, LimitExceeded.code, message)(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # an HTTPException, which FastAPI's own body parsing lets through unchanged
                    raise HTTPException(413, f"request body passed {seen} bytes; the limit is {name}={limit}")
            return message

        await self.app(scope, limited, send)


class RequestMetrics:
    """Counts requests and times them per route template (`/tasks/{task}`, not one series per task name)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            method = scope["method"]
            self.metrics.requests.labels(endpoint, method, str(status)).inc()
            self.metrics.latency.labels(endpoint, method).observe(time.perf_counter() - start)

"""ASGI middleware: request-body limits enforced while the body streams in, and per-endpoint metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import LimitExceeded, error_response
from .metrics import Metrics

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class BodyLimit:
    """Refuses a body over its path's limit (at once from Content-Length, else as soon as the stream passes it),
    and one whose next piece takes longer than `read_timeout` seconds to arrive (408)."""

    def __init__(
        self, app: ASGIApp, limit_for: Callable[[str, str], tuple[int, str]], read_timeout: float = 30.0
    ) -> None:
        self.app = app
        self.limit_for = limit_for
        self.read_timeout = read_timeout

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
        seen, complete = 0, False

        async def limited() -> Message:
            nonlocal seen, complete
            if complete:  # only a disconnect can follow: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except asyncio.TimeoutError:  # HTTPExceptions pass FastAPI's own body parsing unchanged
                raise HTTPException(
                    408, f"the request body stalled for {self.read_timeout:g}s (read_timeout_seconds)"
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > limit:
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
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"  # a closed set of series
            self.metrics.requests.labels(endpoint, method, str(status)).inc()
            self.metrics.latency.labels(endpoint, method).observe(time.perf_counter() - start)

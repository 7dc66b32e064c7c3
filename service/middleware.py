"""ASGI middleware: request-body limits enforced while the body streams in, the generation headers (read your
own writes across replicas), and per-endpoint metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fastapi.concurrency import run_in_threadpool
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


class Generations:
    """Every response carries `X-Clipbank-Generation` (the store generation of the bank that answered: for a
    classification, the bank its batch ran on) and `X-Clipbank-Replica`. A request with `X-Min-Generation: g` is
    answered only from generation g or later: a server behind it reads the store first, and if still behind
    answers 503 `stale_replica` with Retry-After."""

    def __init__(self, app: ASGIApp, service: Any) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        wanted = dict(scope["headers"]).get(b"x-min-generation")
        if wanted is not None:
            refused = await self._refusal(wanted)
            if refused is not None:
                return await refused(scope, receive, send)
        service = self.service

        async def with_generation(message: Message) -> None:
            if message["type"] == "http.response.start" and service.ready.is_set() and service.registry is not None:
                answered = scope.get("state", {}).get("generation", service.registry.bank.generation)
                headers = [*message.get("headers", []), (b"x-clipbank-generation", str(answered).encode())]
                message = {**message, "headers": [*headers, (b"x-clipbank-replica", service.replica.encode())]}
            await send(message)

        await self.app(scope, receive, with_generation)

    async def _refusal(self, wanted: bytes) -> Any:
        if not wanted.isdigit() or len(wanted) > 18:
            return error_response(400, "bad_request", "X-Min-Generation must be a non-negative integer")
        want, registry = int(wanted), self.service.registry
        if registry is not None and self.service.ready.is_set() and registry.bank.generation < want:
            await run_in_threadpool(registry.refresh)
        have = registry.bank.generation if registry is not None and self.service.ready.is_set() else None
        if have is None or have < want:
            message = f"this server answers from generation {have}, behind the X-Min-Generation {want} asked for"
            return error_response(503, "stale_replica", message, details={"generation": have, "wanted": want})
        return None


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

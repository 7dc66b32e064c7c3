"""ASGI middleware: the request head's size, request-body limits enforced while the body streams in, the
generation headers (read your own writes across replicas), and per-endpoint metrics."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.to_thread
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import (
    ERROR_HEADER,
    ClipbankError,
    LimitExceeded,
    Overloaded,
    UnsupportedMediaType,
    error_response,
    status_of,
)
from .metrics import Metrics
from .protocol import ANSWERED_HERE, PEER, client_key
from .request_ids import stopped_at_shutdown

REFRESH_WAIT_SECONDS = 5.0  # how long a request with X-Min-Generation waits for the store's state
SENT_METHOD = "clipbank.sent_method"  # the scope's method as the client sent it, when a middleware changed it
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# answered whatever X-Min-Generation asks: /healthz is 200 while the process runs, and /metrics is scraped (a
# header a proxy adds to every request made them 503). /readyz keeps it: a balancer may ask if a replica is behind
ANY_GENERATION = frozenset({"/healthz", "/metrics"})


MAX_HEAD_BYTES = 16 * 1024  # h11's bound on a head still arriving; this one holds for a head that came whole


class HeadLimit:
    """Refuses a request whose head (request line and headers) is over MAX_HEAD_BYTES with 431 `head_too_large`.
    h11 bounds only a head that is still incomplete, so a larger one that arrives in one read was let through."""

    def __init__(self, app: ASGIApp, limit: int = MAX_HEAD_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            size += sum(len(name) + len(value) + 4 for name, value in scope["headers"])  # "name: value\r\n"
            if size > self.limit:
                message = f"the request head is {size} bytes; the limit is {self.limit} (16 KiB)"
                return await error_response(431, "head_too_large", message)(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses a body over its path's limit (at once from Content-Length, else as soon as the stream passes it),
    and one whose next piece takes longer than `read_timeout` seconds to arrive, or whose client keeps the server
    waiting longer than `read_timeout` plus a second per `min_rate` bytes it sent, of which at most twice
    `read_timeout` may be saved up (408: one byte every 20 s held a connection for ever, and 1024 of them every
    connection).

    All requests together may hold at most `max_buffered` bytes of body until they are answered (and of answers
    until their clients take them): each one's limit alone let 1024 slow connections hold 64 GiB. One client
    address's requests (`client_key`: IPv6 by its /64) may hold at most `max_per_client` of them (0: no cap), so
    one fast client cannot hold them all. Past either, the request that would cross it gets 503 `overloaded` with
    Retry-After (its connection's bytes are then released)."""

    def __init__(
        self,
        app: ASGIApp,
        limit_for: Callable[[str, str], tuple[int, str]],
        read_timeout: float = 30.0,
        max_buffered: int | None = None,
        max_per_client: int = 0,
        routed: Callable[[Scope], bool] | None = None,
        min_rate: int = 0,
        unauthorized: Callable[[Scope], ClipbankError | None] | None = None,
    ) -> None:
        self.app = app
        self.limit_for = limit_for
        self.unauthorized = unauthorized  # a route's token refusal, answered before a declared body's 413
        self.routed = routed  # False: no route takes this method and path, so its 404 or 405 reads no body
        self.read_timeout = read_timeout
        self.min_rate = min_rate
        self.max_buffered = max_buffered
        self.max_per_client = max_per_client
        self.held = 0  # body bytes received by requests not yet answered (one event loop: no lock)
        self.held_by: dict[str, int] = {}  # the same, per client address (only those holding any)

    def _full(self, more: int, who: str | None) -> str | None:
        mine = self.held_by.get(who, 0) if who is not None else 0
        if self.max_per_client and who is not None and mine + more > self.max_per_client:
            return (
                f"this client ({who}) holds {mine} bytes of request bodies not yet answered (or answers it has not "
                "read) and this one would pass "
                f"max_client_buffered_bytes={self.max_per_client}: retry when they are answered"
            )
        if self.max_buffered is None or self.held + more <= self.max_buffered:
            return None
        return (
            f"the server holds {self.held} bytes of other requests' bodies and unread answers, and this one would pass "
            f"max_buffered_bytes={self.max_buffered}: retry shortly"
        )

    def _hold(self, who: str | None, size: int) -> None:
        self.held += size
        if who is not None:
            left = self.held_by.get(who, 0) + size
            if left:
                self.held_by[who] = left
            else:
                self.held_by.pop(who, None)

    def _refusal(self, scope: Scope, limit: int, setting: str, name: str, who: str | None) -> ASGIApp | None:
        """The answer to a request refused from its head alone: two framings, a bad or too large Content-Length
        (the route's 401 first, for a client without its token), or no room left for its body."""
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        refused = _header_problem(scope) or _framing_problem(headers, self.routed is None or self.routed(scope))
        if refused is not None:  # two framings: what follows cannot be told from a request, so the connection closes
            return error_response(*refused, headers={"Connection": "close"} if refused[0] == 400 else None)
        if declared is None or not (self.routed is None or self.routed(scope)):
            return None
        if not declared.isdigit():
            return error_response(400, "bad_request", "Content-Length is not a number")
        if int(declared) > limit:
            refusal = self.unauthorized(scope) if self.unauthorized is not None else None
            if refusal is not None:
                return error_response(status_of(refusal), refusal.code, str(refusal))
            message = f"request body is {int(declared)} bytes; the limit is {name}"
            details = {"setting": setting, "limit": limit} if setting else None  # a client can send less
            return error_response(413, LimitExceeded.code, message, details=details)
        full = self._full(int(declared), who)
        return error_response(503, Overloaded.code, full) if full is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, setting = self.limit_for(scope["method"], scope["path"])
        name = f"{setting}={limit}" if setting else f"{limit} bytes for this endpoint (not a setting)"
        who = client_key(scope.get(PEER, scope.get("client")))  # the socket's peer, not a forwarded address
        refused = self._refusal(scope, limit, setting, name, who)
        if refused is not None:
            return await refused(scope, receive, send)
        seen, complete, waited = 0, False, 0.0  # waited: time spent waiting for the client's bytes
        # The seconds the client may still keep the server waiting: each byte adds 1/min_rate, each wait takes its
        # time (the app's own time between reads is not charged). Capped: a client that sent 64 MiB at once had
        # earned 18 hours, and 16 of them, a byte every 20 s, held max_buffered_bytes and every /classify got 503.
        credit, most = self.read_timeout, 2 * self.read_timeout

        async def limited() -> Message:
            nonlocal seen, complete, waited, credit
            if complete:  # only a disconnect can follow: no deadline
                return await receive()
            wait, slow = self.read_timeout, False
            if self.min_rate:
                wait, slow = min(wait, max(credit, 0.001)), credit < wait
            started = time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), wait)
            except asyncio.TimeoutError:  # HTTPExceptions pass FastAPI's own body parsing unchanged
                if slow:
                    raise HTTPException(
                        408,
                        f"the request body came too slowly: min_body_rate={self.min_rate} bytes/s past "
                        f"read_timeout_seconds={self.read_timeout:g}, of which at most {most:g} s can be saved up "
                        f"({seen} bytes in {waited + wait:.1f}s)",
                    ) from None
                raise HTTPException(
                    408, f"the request body stalled for {self.read_timeout:g}s (read_timeout_seconds)"
                ) from None
            took = time.monotonic() - started
            waited += took
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                if self.min_rate:
                    credit = min(credit - took + size / self.min_rate, most)
                full = self._full(size, who)
                if full is not None:
                    raise HTTPException(503, full)
                seen = seen + size
                self._hold(who, size)
                complete = not message.get("more_body", False)
                if seen > limit:
                    raise BodyTooLarge(f"request body passed {seen} bytes; the limit is {name}", setting, limit)
            return message

        try:
            await self.app(scope, limited, self._counted(send, who))
        finally:
            self._hold(who, -seen)

    def _counted(self, send: Send, who: str | None) -> Send:
        """`send`, an answer's body counted as held until the client has taken it: a send waits while the socket's
        buffer is full (an outside check: 150 connections that never read their 15 MB answers held 0.9 GB beyond
        the bound)."""

        async def counted(message: Message) -> None:
            size = len(message.get("body", b"")) if message["type"] == "http.response.body" else 0
            self._hold(who, size)
            try:
                await send(message)
            finally:
                self._hold(who, -size)

        return counted


class BodyTooLarge(HTTPException):
    """A body without a declared length that passed its limit while read: an HTTPException, so FastAPI's body
    parsing lets it through, with the details a declared one's 413 has."""

    def __init__(self, message: str, setting: str | None, limit: int) -> None:
        super().__init__(413, message)
        self.details = {"setting": setting, "limit": limit} if setting else None


# a second copy is ambiguous (X-Request-ID: a proxy may append its own; the first is taken)
SINGLE = (b"authorization", b"content-type", b"x-min-generation")


def _header_problem(scope: Scope) -> tuple[int, str, str] | None:
    """(400, code, message) for headers that read two ways: a second Authorization, Content-Type or
    X-Min-Generation (the first copy of one and the last of another won: an outside check), or a chunked body in
    HTTP/1.0, which has no chunked coding (RFC 9112 6.1: the framing is faulty)."""
    names = [name.lower() for name, _ in scope["headers"]]
    twice = next((n for n in SINGLE if names.count(n) > 1), None)
    if twice is not None:
        return 400, "bad_request", f"the {twice.decode().title()} header is sent more than once: send it once"
    if scope.get("http_version") == "1.0" and b"transfer-encoding" in names:
        return 400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request: send Content-Length"
    return None


def _framing_problem(headers: dict[bytes, bytes], routed: bool) -> tuple[int, str, str] | None:
    """(status, code, message) for a body the server cannot read as sent: two framings at once (behind a proxy
    that frames by Content-Length, a request smuggled inside the body; RFC 9112 6.3), or a content coding (a
    gzipped body was parsed as JSON and failed on byte 0x8b)."""
    if b"transfer-encoding" in headers and b"content-length" in headers:
        return 400, "bad_request", "both Content-Length and Transfer-Encoding: a request may have one framing"
    coding = headers.get(b"content-encoding", b"identity").strip().lower()
    body = b"transfer-encoding" in headers or headers.get(b"content-length", b"0").strip() not in (b"0", b"")
    if routed and body and coding not in (b"", b"identity"):
        shown = coding.decode("latin-1")[:40]
        return 415, UnsupportedMediaType.code, f"Content-Encoding {shown}: send the body uncompressed"
    return None


class AbsoluteForm:
    """A request target in absolute form (`GET http://host:8000/healthz`: what a client sends to a proxy, and what
    RFC 9112 3.2.2 says a server must accept) is served as its path; it was a 404 "no route for GET /http://...".

    Outermost: every layer inside sees the path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = (scope.get("raw_path") or b"") if scope["type"] == "http" else b""
        if raw[:8].lower().startswith((b"http://", b"https://")):
            target = urllib.parse.urlsplit(raw.decode("latin-1")).path or "/"
            path = urllib.parse.unquote(target)
            scope = {**scope, "raw_path": target.encode("latin-1"), "path": path}
        await self.app(scope, receive, send)


class HeadAsGet:
    """HEAD is answered as GET without its body (RFC 9110 9.3.2): load balancers probe `/healthz` with it.

    Outermost, so that the routes see a GET; the metrics count it as HEAD (`SENT_METHOD`), as the access log does."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET", SENT_METHOD: "HEAD"}, receive, headers_only)


class Generations:
    """Every response carries `X-Clipbank-Generation` (the store generation of the bank that answered: for a
    classification, the bank its batch ran on) and `X-Clipbank-Replica`. A request with `X-Min-Generation: g` is
    answered only from generation g or later: a server behind it reads the store first, and if still behind
    answers 503 `stale_replica` with Retry-After. /healthz and /metrics (ANY_GENERATION) answer whatever it asks."""

    def __init__(self, app: ASGIApp, service: Any) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        service = self.service

        async def with_generation(message: Message) -> None:
            if message["type"] == "http.response.start" and service.ready.is_set() and service.registry is not None:
                answered = scope.get("state", {}).get("generation", service.registry.bank.generation)
                headers = [*message.get("headers", []), (b"x-clipbank-generation", str(answered).encode())]
                message = {**message, "headers": [*headers, (b"x-clipbank-replica", service.replica.encode())]}
            await send(message)

        wanted = dict(scope["headers"]).get(b"x-min-generation")
        if wanted is not None and scope["path"] not in ANY_GENERATION:
            refused = await self._refusal(wanted)
            if refused is not None:  # a stale replica's 503 names it and its generation too
                return await refused(scope, receive, with_generation)
        await self.app(scope, receive, with_generation)

    async def _refusal(self, wanted: bytes) -> Any:
        if not wanted.isdigit() or len(wanted) > 18:
            return error_response(
                400, "bad_request", "X-Min-Generation must be a non-negative integer of at most 18 digits"
            )
        want, registry = int(wanted), self.service.registry
        if registry is not None and self.service.ready.is_set() and registry.bank.generation < want:
            with anyio.move_on_after(REFRESH_WAIT_SECONDS):  # a store that does not answer: 503, not minutes
                await anyio.to_thread.run_sync(registry.refresh, abandon_on_cancel=True)
        have = registry.bank.generation if registry is not None and self.service.ready.is_set() else None
        if have is None or have < want:
            message = f"this server answers from generation {have}, behind the X-Min-Generation {want} asked for"
            return error_response(503, "stale_replica", message, details={"generation": have, "wanted": want})
        return None


ERROR_HEADER_BYTES = ERROR_HEADER.lower().encode()


class RequestMetrics:
    """Counts requests and times them per route template (`/tasks/{task}`, not one series per task name)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # the API's routes, for requests answered before routing (`route_template`)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status, code = 500, "internal_error"

        async def send_status(message: Message) -> None:
            nonlocal status, code
            if message["type"] == "http.response.start":
                status = message["status"]
                code = dict(message.get("headers", [])).get(ERROR_HEADER_BYTES, b"").decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except asyncio.CancelledError as e:
            if code == "internal_error" and stopped_at_shutdown(e):  # unanswered: `RequestIds` answers it 503
                status, code = 503, "not_ready"
            raise
        finally:
            status, code = (scope.get("state") or {}).get(ANSWERED_HERE, (status, code))
            endpoint = getattr(scope.get("route"), "path", None) or route_template(scope, self.routes)
            method = scope.get(SENT_METHOD) or scope["method"]  # a HEAD answered as GET counts as HEAD
            method = method if method in KNOWN_METHODS else "other"  # a closed set of series
            self.metrics.requests.labels(endpoint, method, str(status)).inc()
            if status >= 400 and code:  # our codes only: a closed set of series
                self.metrics.errors.labels(endpoint, code).inc()
            self.metrics.latency.labels(endpoint, method).observe(time.perf_counter() - start)


def route_template(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The route template of a request answered before routing (a refused X-Min-Generation, a 431), so its
    answer is counted under its endpoint; "unmatched" only for a path outside the API."""
    for route in routes:
        if route.matches(scope)[0] != Match.NONE:  # PARTIAL: the path, not the method
            return getattr(route, "path", "unmatched")
    return "unmatched"

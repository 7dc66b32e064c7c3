"""Errors of the HTTP layer, and the one place that maps every typed error to a status and a JSON body."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from model_store.errors import (
    BackboneError,
    BundleError,
    BundleNotFound,
    ClipbankError,
    InvalidRequest,
    NoShadow,
    ShadowConflict,
    StoreError,
    TaskDegraded,
    TaskNotFound,
    VersionConflict,
    VersionNotFound,
)
from model_store.gate import InterferenceRefused
from model_store.labels import cut

log = logging.getLogger("clipbank.service")
T = TypeVar("T")


class LimitExceeded(InvalidRequest):
    """A request is larger than a configured limit (bytes, images, pixels, labels). With `setting`, the answer
    carries `details: {"setting", "limit"}`, so a client can send requests that fit (`clipbank classify` does)."""

    code = "limit_exceeded"

    def __init__(self, message: str, setting: str | None = None, limit: int | None = None) -> None:
        super().__init__(message)
        if setting is not None:
            self.details = {"setting": setting, "limit": limit}


class BadImage(InvalidRequest):
    """An uploaded image is not a decodable image of an accepted format."""

    code = "bad_image"


def of_image(index: int, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` for the request's image `index`: a 4xx it raises carries `details: {"image": index}`, so a
    client can leave that one image out and send the rest again (`clipbank classify --skip-bad`)."""
    try:
        return fn(*args)
    except InvalidRequest as e:
        e.details = {"image": index}
        raise


class Unauthorized(ClipbankError):
    code = "unauthorized"


class NotReady(ClipbankError):
    code = "not_ready"


class UnsupportedMediaType(InvalidRequest):
    code = "unsupported_media_type"


class ReplicasLagging(ClipbankError):
    """`POST /tasks?wait=all`: the change is stored, but some replicas did not serve it in time (`details`)."""

    code = "replicas_lagging"

    def __init__(self, message: str, details: dict) -> None:
        super().__init__(message)
        self.details = details


class Overloaded(ClipbankError):
    """More images are waiting than `max_queue_images`, or the server is short of memory: try again shortly."""

    code = "overloaded"


def out_of_memory(what: str = "this request") -> Overloaded:
    """A MemoryError (or no thread to start) is the server's shortage, not a fault of what the client sent: 503
    `overloaded` with Retry-After (an outside check's valid image under a memory limit was a 422 `bad_image`,
    other requests a 500)."""
    return Overloaded(f"the server was short of memory or threads for {what}: try again shortly")


SHORT_OF = ("can't start new thread", "can't allocate memory", "out of memory")  # RuntimeErrors: threads, torch's


def short_of_resources(error: BaseException) -> bool:
    """Python's MemoryError, torch's OutOfMemoryError (CUDA) and its CPU allocator's RuntimeError, no thread."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and any(s in str(error) for s in SHORT_OF)


class RequestTimeout(InvalidRequest):
    """The request's body stopped arriving (a gap longer than the read timeout)."""

    code = "request_timeout"


class ClientGone(ClipbankError):
    """The client closed the connection before the server could answer (logged as 499, like nginx)."""

    code = "client_closed_request"


# Most specific first: the first matching type decides the status.
STATUS: tuple[tuple[type[ClipbankError], int], ...] = (
    (Unauthorized, 401),
    (ClientGone, 499),
    (RequestTimeout, 408),
    (LimitExceeded, 413),
    (UnsupportedMediaType, 415),
    (NotReady, 503),
    (ReplicasLagging, 504),
    (Overloaded, 503),
    (VersionConflict, 409),
    (InterferenceRefused, 409),
    (ShadowConflict, 409),
    (TaskDegraded, 503),
    (NoShadow, 404),
    (TaskNotFound, 404),
    (VersionNotFound, 404),
    (BundleNotFound, 404),
    (BundleError, 422),
    (InvalidRequest, 422),
    (BackboneError, 503),
    (StoreError, 503),
)

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "limit_exceeded",
    503: "overloaded",
}
RETRY_AFTER_SECONDS = {"overloaded": 1, "not_ready": 5, "store_error": 5, "store_write_failed": 30}
NO_RETRY = (
    "store_damaged",
    "store_too_new",
    "store_not_writable",
    "task_degraded",
)  # 503s that retrying cannot fix: an operator must act


def status_of(error: ClipbankError) -> int:
    for kind, status in STATUS:
        if isinstance(error, kind):
            return status
    return 500


ERROR_HEADER = "X-Clipbank-Error"


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, details: dict | None = None
) -> JSONResponse:
    headers = {**(headers or {}), ERROR_HEADER: code}  # the code without the body: metrics and proxies read it
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 503 and code not in NO_RETRY:
        headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS.get(code, 1)))
    body = {"code": code, "message": message, **({"details": details} if details is not None else {})}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def error_body_of(error: Exception) -> tuple[int, str, str]:
    """(status, code, message) for any exception; unexpected ones become a generic 500 and go to the log."""
    if isinstance(error, ClientDisconnect):
        error = ClientGone("the client closed the connection before its body arrived")
    if isinstance(error, ClientGone):
        log.info("client went away: %s", error)
    if short_of_resources(error):
        log.error("the server is short of memory or threads: %s: %s", type(error).__name__, str(error)[:200])
        error = out_of_memory()
    if isinstance(error, ClipbankError):
        return status_of(error), error.code, str(error)
    log.error("unexpected error", exc_info=error)
    return 500, "internal_error", "internal error; the server log has the details"


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:10]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


ROUTE_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> str | None:
    """Every method some route takes at this path (the router's 405 names only the first route's)."""
    methods = {m for m in ROUTE_METHODS if takes(request.app.router.routes, request.scope, m)}
    if "GET" in methods:
        methods.add("HEAD")  # HeadAsGet answers it
    return ", ".join(sorted(methods)) or None


def takes(routes: Any, scope: dict, method: str) -> bool:
    """Whether one of `routes` takes `method` at the scope's path (per request with a body: no copy for its own)."""
    probe = scope if scope["method"] == method else {**scope, "method": method}
    return any(route.matches(probe)[0] == Match.FULL for route in routes)


def _routing_message(request: Request, exc: StarletteHTTPException, headers: dict[str, str] | None) -> str:
    """The router's bare "Not Found" and "Method Not Allowed" say which request and what would be taken."""
    path, method = cut(request.url.path, 120), cut(request.method, 20)  # both are the client's, of any length
    where = f"{method} {path}"
    if exc.status_code == 404 and exc.detail == "Not Found":
        whole = request.url.path
        hint = f" (without the trailing slash: {path.rstrip('/')})" if len(whole) > 1 and whole.endswith("/") else ""
        return f"no route for {where}{hint}: the API's paths are listed at /docs"
    if exc.status_code == 405 and exc.detail == "Method Not Allowed" and headers and "Allow" in headers:
        return f"{path} does not take {method}; it takes {headers['Allow']}"
    return str(exc.detail)


def install_handlers(app: FastAPI) -> None:
    """Every error the app can produce leaves as `{"error": {"code", "message"}}`."""

    @app.exception_handler(ClipbankError)
    async def _clipbank(request: Request, exc: ClipbankError) -> JSONResponse:
        status, code, message = error_body_of(exc)
        wait = getattr(exc, "retry_after", None)  # the error's own, when it knows (a stopped purge's deletion)
        headers = {"Retry-After": str(wait)} if isinstance(wait, int) and status == 503 else None
        return error_response(status, code, message, headers, details=getattr(exc, "details", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405 and (allowed := _allowed_methods(request)):
            headers = {**(headers or {}), "Allow": allowed}
        message = _routing_message(request, exc, headers)
        return error_response(exc.status_code, code, message, headers, details=getattr(exc, "details", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        status, code, message = error_body_of(exc)
        return error_response(status, code, message)

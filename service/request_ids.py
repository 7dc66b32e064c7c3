"""Request ids and the server's log lines: every answer carries `X-Request-ID`, and every log line written while
a request is handled (the access line, a warning, an error) names it, with a timestamp.

A client (or a proxy in front) may send its own `X-Request-ID`, of 1 to 128 characters from `A-Z a-z 0-9 . _ : -`;
the server answers with it, else with one it made (32 hex digits), so a user can quote the id of a failed
request and an operator finds its lines. Work done for many requests at once (a batch on the compute thread) is
logged without one. On Ray Serve the proxy answers with the id (the client's, unchecked, or one of its own) and
the replicas log in Ray's format, which names it; the app then does not add the header a second time.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import re
import sys
import threading
import uuid
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("clipbank.service")
HEADER = "X-Request-ID"
_HEADER_KEY = HEADER.lower().encode()
_ACCEPTED = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
REQUEST_ID: ContextVar[str | None] = ContextVar("clipbank_request_id", default=None)
# clipbank's own lines (`clipbank serve`): time, level, logger, request id, message
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's id when it is one the server may echo, else a new one."""
    given = next((v for k, v in headers if k == _HEADER_KEY), None)
    if given is not None and _ACCEPTED.fullmatch(given):
        return given.decode()
    return uuid.uuid4().hex


class RequestIds:
    """The outermost middleware: sets the request's id for its log lines and answers with it.

    `answer=False` behind a proxy that answers with the id itself (Ray Serve's: it puts the client's id, or one of
    its own, in the request's headers and adds it to the answer), so the answer carries it once, not twice."""

    def __init__(self, app: ASGIApp, answer: bool = True) -> None:
        self.app = app
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = request_id(scope["headers"])
        token = REQUEST_ID.set(rid)
        started = False

        async def with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if self.answer:
                    message = {**message, "headers": [*message.get("headers", []), (_HEADER_KEY, rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, with_id)
        except asyncio.CancelledError as e:
            if started or not stopped_at_shutdown(e):  # Ray Serve cancels a request whose client left: not ours
                raise
            await _stopped(scope, receive, with_id)  # not the server's plain 500 and a traceback
        finally:
            REQUEST_ID.reset(token)


_FORCED_EXIT = threading.Event()  # set by `clipbank serve` on a second Ctrl-C: uvicorn quits without draining


def forced_exit() -> None:
    """The server is quitting at once (a second SIGINT): requests cancelled from now on are answered, not 500s."""
    _FORCED_EXIT.set()


def exiting_at_once() -> bool:
    return _FORCED_EXIT.is_set()


def stopped_at_shutdown(error: BaseException) -> bool:
    """Whether `error` is uvicorn's cancel of a request still running when its graceful shutdown ended (its
    message says so; uvicorn cancels requests for nothing else), or asyncio's when a forced exit ended the loop
    (an outside check's second Ctrl-C gave 8 in-flight requests a plain-text 500 and the log 9 tracebacks)."""
    if not isinstance(error, asyncio.CancelledError):
        return False
    return _FORCED_EXIT.is_set() or any("graceful shutdown" in str(a) for a in error.args)


async def _stopped(scope: Scope, receive: Receive, send: Send) -> None:
    """The answer to a request cancelled before it was answered: uvicorn cancels what still runs once the graceful
    shutdown's 30 s have passed (a slow upload, a change waiting for the store's lock). An outside check's client
    got a plain-text 500, with a traceback in the log, though the change had not been made."""
    from .errors import error_response

    log.warning("stopped before it was answered: the server is shutting down (%s %s)", scope["method"], scope["path"])
    message = (
        "the server shut down before this request was answered (it still ran when the grace period ended, or a "
        "second Ctrl-C stopped the server at once); a "
        "change it asked for may have landed or not (GET /tasks says): send it again once a server is ready"
    )
    await error_response(503, "not_ready", message)(scope, receive, send)


class RequestIdFilter(logging.Filter):
    """Gives every record a `request_id` (the request being handled, else "-"), for the formats below."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get() or "-"
        return True


class JsonLines(logging.Formatter):
    """`--log-format json`: one JSON object per line, for log shippers (Loki, Elasticsearch, CloudWatch): `time`
    (UTC, ISO 8601), `level`, `logger`, `request_id`, `message`; an access line's `client`, `method`, `path`,
    `http` and `status` as fields; a traceback as `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            line.update(zip(("client", "method", "path", "http", "status"), record.args, strict=True))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


class LinesToAClosedReader(logging.StreamHandler):
    """A stream handler that stops when its reader went away (`clipbank serve | head`, a log shipper that died),
    and says so once: each line wrote a 125-line traceback to stderr instead (an outside check)."""

    said_closed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.said_closed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, BrokenPipeError) and not (isinstance(error, ValueError) and "closed" in str(error)):
            super().handleError(record)
            return
        self.said_closed = True
        name = getattr(self.stream, "name", "a log stream")
        try:
            print(f"clipbank: {name} was closed (its reader went away): its log lines are dropped", file=sys.stderr)
        except (OSError, ValueError):  # stderr itself is that stream
            pass


def plain_terminal() -> bool:
    """NO_COLOR (no-color.org) or TERM=dumb: log lines without colour codes, on a terminal too."""
    return bool(os.environ.get("NO_COLOR")) or os.environ.get("TERM") == "dumb"


def printed_line(message: str, log_format: str, level: int = logging.WARNING, said_by: str = "clipbank") -> str:
    """A line printed whatever the log level (the generated admin token), as the log's other lines are."""
    if log_format != "json":
        return f"{said_by}: {message}"
    record = logging.LogRecord("clipbank.service", level, __file__, 0, message, None, None)
    return JsonLines().format(record)


def uvicorn_log_config(log_format: str = "text") -> dict[str, Any]:
    """uvicorn's own logging configuration with a timestamp on every line and the request id on access lines
    (`json`: JsonLines for both)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {**config.get("filters", {}), "request_id": {"()": RequestIdFilter}}
    formatters = config["formatters"]
    formatters["default"]["fmt"] = "%(asctime)s " + formatters["default"]["fmt"]
    formatters["access"]["fmt"] = formatters["access"]["fmt"].replace(
        "%(levelprefix)s ", "%(asctime)s %(levelprefix)s [%(request_id)s] ", 1
    )
    if plain_terminal():
        for formatter in formatters.values():
            formatter["use_colors"] = False
    if log_format == "json":
        config["formatters"] = {name: {"()": JsonLines} for name in formatters}
    for handler in config["handlers"].values():
        handler["filters"] = [*handler.get("filters", []), "request_id"]
        if handler.get("class") == "logging.StreamHandler":
            handler["class"] = f"{__name__}.{LinesToAClosedReader.__name__}"
    return config


def log_with_request_ids(level: int, log_format: str = "text") -> None:
    """clipbank's lines (through the root logger's handler) in LOG_FORMAT, or JsonLines, for `clipbank serve`."""
    logging.basicConfig(level=level, format=LOG_FORMAT, force=True, handlers=[LinesToAClosedReader()])
    for handler in logging.getLogger().handlers:
        if log_format == "json":
            handler.setFormatter(JsonLines())
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())

"""Run the app under uvicorn: graceful shutdown (in-flight requests finish) and a non-zero exit if start-up fails."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn

from model_store.backbone import pick_device
from model_store.errors import BackboneError

from .app import create_app
from .config import ServeConfig
from .protocol import PEER, guarded_protocol
from .request_ids import exiting_at_once, forced_exit, printed_line, uvicorn_log_config

log = logging.getLogger("clipbank.service")
GRACEFUL_SECONDS = 30


def serve(config: ServeConfig) -> int:
    """Serve until SIGINT/SIGTERM/SIGHUP. Returns the process exit code. `--engine ray`: replicas on Ray Serve."""
    if config.engine == "ray":
        try:
            import ray.serve  # noqa: F401 - present?
        except ImportError as e:
            log.error("--engine ray needs Ray Serve: pip install 'clipbank[scale]' (%s)", e)
            return 2
        from .ray_engine import run

        return run(config)
    try:
        pick_device(config.device)  # a device this machine lacks fails now, not after "startup complete"
    except BackboneError as e:
        return failed(f"start-up failed: {e.code}: {e}", config.log_format)
    try:  # before the app: a port in use loaded the backbone and the bank, and logged them after the error
        check_listening(config.host, config.port)
    except OSError as e:
        return failed(
            f"start-up failed: cannot listen on {config.host} port {config.port}: {e.strerror or e}", config.log_format
        )
    say_if_open_to_the_network(config)
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def fatal(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(config, on_fatal=fatal)
    server = _Server(uvicorn_config(app, config))
    hide_secrets_in_access_log()
    quiet = _ForcedExitCancels()
    logging.getLogger("uvicorn.error").addFilter(quiet)
    try:
        server.run()
    finally:
        logging.getLogger("uvicorn.error").removeFilter(quiet)
    if failure:
        return failed(failure[0], config.log_format)
    if server.force_exit:  # asyncio swallowed the second SIGINT, and the exit said 0
        log.warning("stopped at once (a second Ctrl-C): any request still in flight was answered 503 not_ready")
        return 130
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server, also stopped gracefully by SIGHUP (a closed terminal: it killed the server at once, and
    its in-flight requests with it), and whose forced exit (a second Ctrl-C) answers what it cancels."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self.force_exit:
            forced_exit()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        hangup = hangup_signals()
        if not hangup or threading.current_thread() is not threading.main_thread():
            with super().capture_signals():
                yield
            return
        before = signal.signal(hangup[0], lambda _, frame: self.handle_exit(signal.SIGTERM, frame))  # as SIGTERM
        try:
            with super().capture_signals():
                yield
        finally:
            signal.signal(hangup[0], before)


def hangup_signals() -> tuple[int, ...]:
    """(SIGHUP,) where a closed terminal should stop the server as SIGTERM does; () where the platform has none, or
    the process was started with it ignored (`nohup clipbank serve`: a closed terminal is then no stop)."""
    hangup = getattr(signal, "SIGHUP", None)
    return () if hangup is None or signal.getsignal(hangup) is signal.SIG_IGN else (hangup,)


class _ForcedExitCancels(logging.Filter):
    """Drops the traceback of the app's lifespan, cancelled by a forced exit (no error: the server quits), which
    Starlette sends uvicorn as a message's text."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not exiting_at_once():
            return True
        text = str(record.msg)
        return not (text.startswith("Traceback") and text.rstrip().endswith("CancelledError"))


def say_if_open_to_the_network(config: ServeConfig) -> None:
    """A server bound beyond this machine whose /classify (and /metrics) anyone who reaches it may use: said at
    start (an outside check's `--host 0.0.0.0` was taken without a word). A line, not a warning: a container must
    listen on every address, and there the port's publication decides (compose's PUBLISH_ADDR: 127.0.0.1)."""
    try:
        loopback = all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(config.host, None))
    except (OSError, ValueError):
        return
    if not loopback and not config.classify_token:
        log.info(
            "listening on %s, beyond this machine, with /classify and /metrics open to anyone who reaches the port: "
            "set CLIPBANK_CLASSIFY_TOKEN, or publish the port on 127.0.0.1 behind a proxy (docs/deployment.md)",
            config.host,
        )


def failed(reason: str, log_format: str = "text") -> int:
    """Exit status 3, its reason logged as the last line (printed at --log-level critical, which logs no error)."""
    if log.isEnabledFor(logging.ERROR):
        log.error("%s", reason)
    else:
        print(printed_line(reason, log_format, logging.ERROR, "clipbank serve"), file=sys.stderr)
    return 3


def uvicorn_config(app: Any, config: ServeConfig) -> uvicorn.Config:
    """uvicorn's settings for the app (making them configures uvicorn's loggers: filters are added after)."""
    return uvicorn.Config(
        peer_then_forwarded(app),
        proxy_headers=False,  # applied inside peer_then_forwarded, after the socket's peer is kept
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        log_config=uvicorn_log_config(config.log_format),  # its own, with timestamps and the access lines' request ids
        timeout_graceful_shutdown=GRACEFUL_SECONDS,
        timeout_keep_alive=config.keep_alive_seconds,  # type: ignore[arg-type] - a float works
        http=guarded_protocol(
            config.head_timeout_seconds,
            config.max_connections,
            config.read_timeout_seconds,
            config.max_connections_per_client,
        ),
        ws="none",  # an Upgrade: websocket header got a bare 403 and its GET was not served
        lifespan="on",
        loop="asyncio",  # not uvloop, even where it is installed (Ray brings it): one loop, measured and tested
    )


def peer_then_forwarded(app: Any) -> Any:
    """`app` behind uvicorn's X-Forwarded-For handling (as `proxy_headers` applies it: from FORWARDED_ALLOW_IPS,
    127.0.0.1 by default), with the socket's own peer kept in the scope first: the per-client body share keys on it
    as the connection cap does, where a header any local process can set would let it pass the share."""
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    async def an_address(scope: Any, receive: Any, send: Any) -> None:
        """A forwarded "address" that is none is not taken: `"hello world" - "GET /tasks HTTP/1.1" 200 OK fake`
        wrote a whole false line into the access log (an outside check)."""
        client = scope.get("client")
        if client and scope.get(PEER) and not _is_address(client[0]):
            scope["client"] = scope[PEER]
        await app(scope, receive, send)

    forwarded = ProxyHeadersMiddleware(an_address, trusted_hosts=os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1"))

    async def with_peer(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scope[PEER] = scope.get("client")
        await forwarded(scope, receive, send)

    return with_peer


def _is_address(host: object) -> bool:
    try:
        ipaddress.ip_address(host)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


def check_listening(host: str, port: int) -> None:
    """OSError now if the server could not listen on (host, port): a port in use, an unknown host. Each address
    the host names is bound for a moment as asyncio will bind it (IPv6 sockets IPv6 only; a family this machine
    cannot make a socket of is skipped). Another process could still take the port before uvicorn binds it."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    for family, kind, proto, _, address in found:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:  # asyncio skips such a family too
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's: a socket in TIME_WAIT is fine
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)


# query parameter names whose values an access line must not show (matched in lower case, percent-decoded)
SECRET_WORDS = ("token", "key", "secret", "passw", "pwd", "auth", "bearer", "jwt", "sig", "credential", "session")


def without_secrets(query: str) -> str:
    """`query` with the value of every parameter whose name holds a SECRET_WORDS entry as `***` (split, not a
    regular expression: a long name repeating a word made one backtrack for a quarter of a second per line)."""
    parts = []
    for part in query.split("&"):
        name, eq, _ = part.partition("=")
        secret = eq and any(w in urllib.parse.unquote_plus(name).lower() for w in SECRET_WORDS)
        parts.append(f"{name}=***" if secret else part)
    return "&".join(parts)


def hide_secrets_in_access_log() -> None:
    access = logging.getLogger("uvicorn.access")
    for kind in (SecretsOutOfAccessLog, QuietProbes):
        if not any(isinstance(f, kind) for f in access.filters):
            access.addFilter(kind())


PROBES = ("/healthz", "/readyz", "/metrics")  # asked every few seconds by health checks and scrapers


class QuietProbes(logging.Filter):
    """A health check's or a scraper's 200 leaves no access line below `--log-level debug` (the container's health
    check wrote one every 30 s, a Prometheus scrape one every 15: an outside check's); any other answer to them
    does, and `clipbank_requests_total` counts them all."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not (isinstance(args, tuple) and len(args) >= 5 and args[4] == 200 and isinstance(args[2], str)):
            return True
        return args[2].partition("?")[0] not in PROBES or logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


class SecretsOutOfAccessLog(logging.Filter):
    """A token sent in the query (`?token=...`, which the server refuses: tokens go in `Authorization`) was written
    to the access log in clear. Such values are logged as `***`."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            path, _, query = args[2].partition("?")
            record.args = (*args[:2], f"{path}?{without_secrets(query)}", *args[3:])
        return True

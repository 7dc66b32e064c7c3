"""uvicorn's HTTP/1.1 protocol with the guards it lacks: a deadline for each request head, caps on open
connections (in all, and from one client address), and JSON bodies (the API's error shape) for the errors uvicorn
itself answers."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import struct
from collections.abc import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("clipbank.service")
REASONS = {400: "Bad Request", 408: "Request Timeout", 501: "Not Implemented", 503: "Service Unavailable"}
LINGER_SECONDS = 1.0


PEER = "clipbank.peer"  # the socket's own peer, kept in the scope before X-Forwarded-For replaces its client
ANSWERED_HERE = "clipbank.answered_by_protocol"  # (status, code) of an answer written here while the app ran


def raw_error(status: int, code: str, message: str, extra: tuple[str, ...] = ()) -> bytes:
    """A complete HTTP/1.1 error response with the API's JSON body, for answering outside the ASGI app."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [
        f"HTTP/1.1 {status} {REASONS[status]}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        f"x-clipbank-error: {code}",  # as the application's errors say it, for proxies that read no body
        *extra,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _closes(name: bytes, value: bytes) -> bool:
    return name.lower() == b"connection" and b"close" in value.lower()


class GuardedH11Protocol(H11Protocol):
    """H11Protocol that closes a connection whose request head is not complete `head_timeout` seconds after it
    opened (or after its previous response), and refuses connections beyond `max_connections`. Subclass it with
    the two settings through `guarded_protocol`."""

    head_timeout: float = 10.0
    max_connections: int = 1024
    write_timeout: float = 30.0  # an answer the client reads none of for this long: the connection is dropped
    max_per_client: int = 0  # open connections from one address (0: no cap): one client held all 1024 otherwise

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._lingering = False
        self._protocol_error: h11.RemoteProtocolError | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._close_gently: Callable[[], None] | None = None  # set when an answer came before its body
        super().connection_made(transport)
        parse = self.conn.next_event

        def next_event() -> object:  # uvicorn answers every parse error "Invalid HTTP request received."
            try:
                return parse()
            except h11.RemoteProtocolError as e:
                self._protocol_error = e  # what h11 said: "Missing mandatory Host: header"
                raise

        self.conn.next_event = next_event  # type: ignore[method-assign]
        send, close = self.conn.send, transport.close

        def send_event(event: object) -> object:  # an answer before the body says it closes the connection
            if isinstance(event, h11.Response) and self.conn.their_state is h11.SEND_BODY:
                headers = [*event.headers, (b"connection", b"close")]
                event = h11.Response(status_code=event.status_code, headers=headers, reason=event.reason)
                self._close_gently = close
            elif isinstance(event, h11.Response) and self._kept_open(event):
                headers = [*event.headers, (b"keep-alive", b"timeout=%d" % int(self.timeout_keep_alive))]
                event = h11.Response(status_code=event.status_code, headers=headers, reason=event.reason)
            return send(event)

        def close_gently() -> None:  # uvicorn closes at once on `Connection: close`: a client still sending
            if self._close_gently is not None and not self._lingering:  # its body would get a reset instead
                self._linger(self._close_gently)
            else:
                close()

        self.conn.send = send_event  # type: ignore[method-assign]
        transport.close = close_gently  # type: ignore[method-assign]
        self._head_timer: asyncio.TimerHandle | None = None
        self._timed_cycle = None
        self._peer = client_key(transport.get_extra_info("peername"))
        if len(self.connections) > self.max_connections:
            log.warning(
                "refused a connection: %d open; max_connections=%d", len(self.connections), self.max_connections
            )
            message = f"the server has max_connections={self.max_connections} open; retry shortly"
            self._close_with(503, "overloaded", message, ("retry-after: 1",))
            return
        if self.max_per_client and self._peer is not None:
            mine = sum(1 for c in self.connections if getattr(c, "_peer", None) == self._peer)
            if mine > self.max_per_client:  # a slow drip from one client held every connection: all got 503
                log.warning(
                    "refused a connection from %s: it has %d open; max_connections_per_client=%d",
                    self._peer,
                    mine - 1,
                    self.max_per_client,
                )
                message = f"this client has max_connections_per_client={self.max_per_client} open; retry shortly"
                self._close_with(503, "overloaded", message, ("retry-after: 1",))
                return
        self._arm_head_timer()

    def _kept_open(self, response: h11.Response) -> bool:
        """Whether the connection stays open after `response`: then it says for how long an idle one is kept
        (`Keep-Alive: timeout=N`), so a client that reads the hint (Node's fetch) drops it first. Node keeps idle
        sockets as long as this server's default (5 s), and a request sent on one as the server closed it failed
        without a status (an outside check's, 10 of 10 after a busy event loop)."""
        if self.conn.their_http_version != b"1.1" or self.timeout_keep_alive < 1:  # below 1 s: "timeout=0" says none
            return False
        asked = self.cycle.scope["headers"] if self.cycle is not None else []  # `Connection: Close` too (uvicorn: not)
        return not any(_closes(name, value) for name, value in (*response.headers, *asked))

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._timed_cycle = self.cycle
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        idle = self.cycle is None or self.cycle.response_complete
        if self.cycle is self._timed_cycle and idle and not self.transport.is_closing():
            message = f"no complete request head within {self.head_timeout:g}s (head_timeout_seconds)"
            self._close_with(408, "request_timeout", message)

    def _close_with(self, status: int, code: str, message: str, extra: tuple[str, ...] = ()) -> None:
        """Answer, then close gently: closing with the client's bytes unread would make the kernel send a
        reset, and the client would never read the answer. So: end our side, drop what it still sends for a
        moment, then close."""
        if self.transport.is_closing() or self._lingering:
            return
        self.transport.write(raw_error(status, code, message, extra))
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:  # the app still runs (a head, then a malformed body):
            cycle.disconnected = True  # its answer must not follow this one; each one logged a RuntimeError traceback
            cycle.message_event.set()  # ("Cannot call write() after write_eof()"), any client could cause them
            state = cycle.scope.get("state")  # shared by the middlewares' copies of the scope: the metrics count
            if isinstance(state, dict):  # what the client got, not the 499 the app answers to the disconnect
                state[ANSWERED_HERE] = (status, code)
        self._linger()

    def _linger(self, close: Callable[[], None] | None = None) -> None:
        self._lingering = True
        try:
            if self.transport.can_write_eof():
                self.transport.write_eof()
        except OSError:  # the client reset the connection first (ENOTCONN): nothing left to end gently
            self.transport.close()
            return
        self.loop.call_later(LINGER_SECONDS, close or self.transport.close)

    def data_received(self, data: bytes) -> None:
        if not self._lingering:
            super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._timed_cycle:  # a new request head arrived
            self._cancel_head_timer()
            self._timed_cycle = self.cycle

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may already start a pipelined request
        idle = self.cycle is None or self.cycle.response_complete
        if not idle or self.transport.is_closing() or self._lingering:
            return
        if self.conn.their_state is h11.SEND_BODY:
            # an answer came before the body (413, 415, 401): the rest of it would be parsed as the body of a
            # request already answered, and the next request on the connection waited for a 408; so close, gently
            self._linger()
        else:
            self._arm_head_timer()  # the next request's head has the same deadline

    def pause_writing(self) -> None:
        """The answer waits in our buffer (the socket's is full): the client must read some of it within
        `write_timeout`, or the connection is dropped. One that never read held its answer (up to
        max_response_bytes, and more in memory while it was encoded) for as long as it stayed connected."""
        super().pause_writing()
        self._watch_writes(self.transport.get_write_buffer_size())

    def _watch_writes(self, waiting: int) -> None:
        self._cancel_write_timer()
        self._write_timer = self.loop.call_later(self.write_timeout, self._writes_checked, waiting)

    def _writes_checked(self, waiting: int) -> None:
        self._write_timer = None
        now = self.transport.get_write_buffer_size()  # a closing transport still holds it, until it is sent
        if now == 0:
            return
        if now < waiting:  # it reads, slowly: watch on
            return self._watch_writes(now)
        log.warning("dropped a connection whose client read none of its answer for %gs", self.write_timeout)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:  # a reset: the kernel's copy of the answer goes too, not only ours
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def resume_writing(self) -> None:
        self._cancel_write_timer()
        super().resume_writing()

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_write_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        error = self._protocol_error
        if error is not None and error.error_status_hint == 501:  # a transfer coding other than chunked
            self._close_with(501, "not_implemented", f"{error} (RFC 9112 6.1)")
        else:
            said = str(error or msg).replace("bytearray(b", "(")[:160]  # not the client's 15 KB request line
            self._close_with(400, "bad_request", f"{said} (malformed HTTP)")

    def _unsupported_upgrade_warning(self) -> None:
        """No WebSocket here (`ws="none"`): a request asking to upgrade is served as plain HTTP, unlogged (each
        one logged two warnings, one of them telling the operator to install a WebSocket library)."""


def client_key(peername: object) -> str | None:
    """Who a connection is from, for max_connections_per_client: its IPv4 address, or its IPv6 /64 (one host's
    usual share: an address per connection would pass any cap); None for a Unix socket."""
    if not isinstance(peername, tuple) or not peername or not isinstance(peername[0], str):
        return None
    try:
        address = ipaddress.ip_address(peername[0].split("%", 1)[0])
    except ValueError:
        return peername[0]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # a dual-stack socket's IPv4 client
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def guarded_protocol(
    head_timeout: float, max_connections: int, write_timeout: float = 30.0, max_per_client: int = 0
) -> type[H11Protocol]:
    """The protocol class uvicorn should use (`http=`), with these settings."""
    settings = {
        "head_timeout": head_timeout,
        "max_connections": max_connections,
        "write_timeout": write_timeout,
        "max_per_client": max_per_client,
    }
    return type("GuardedH11Protocol", (GuardedH11Protocol,), settings)

"""Connection-level guards on a real server: a cap on open connections, request-head deadlines, kept-alive reuse."""

from __future__ import annotations

import contextlib
import json
import socket
import time

import pytest

from benchmarks.process import server_process

pytestmark = pytest.mark.slow
HEAD_SECONDS = 1.0
WRITE_SECONDS = 2.0
TCP_CLOSE = 7  # a socket's TCP state once the peer reset it
MIN_RATE = 100  # bytes per second a body must average past the read timeout


LOG: dict[str, object] = {}  # the server's log file


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("connections")
    env = {
        "CLIPBANK_ADMIN_TOKEN": "connections-token-0123456789",
        "CLIPBANK_FROZEN_RUNTIME": "torch",
        "CLIPBANK_MAX_CONNECTIONS": "6",
        "CLIPBANK_MAX_CONNECTIONS_PER_CLIENT": "3",
        "CLIPBANK_MIN_BODY_RATE": str(MIN_RATE),
        "CLIPBANK_HEAD_TIMEOUT_SECONDS": str(HEAD_SECONDS),
        "CLIPBANK_KEEP_ALIVE_SECONDS": "0.5",
        "CLIPBANK_READ_TIMEOUT_SECONDS": str(WRITE_SECONDS),  # also how long an unread answer may wait
    }
    LOG["server"] = tmp / "server.log"
    with server_process(tmp / "store", (), env, tmp / "server.log", ready_seconds=180) as (url, _):
        yield int(url.rsplit(":", 1)[1])


class Conn:
    """A raw HTTP/1.1 connection that reads one response at a time (pipelined ones stay buffered)."""

    def __init__(self, port: int, source: str | None = None) -> None:  # source: another loopback address
        self.sock = socket.create_connection(("127.0.0.1", port), source_address=(source, 0) if source else None)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, seconds: float = 5.0) -> tuple[int, dict]:
        self.sock.settimeout(seconds)
        while True:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if sep and len(rest) >= _length(head):
                n = _length(head)
                self.buf = rest[n:]
                return int(head.split(b" ")[1]), json.loads(rest[:n] or b"{}")
            piece = self.sock.recv(65536)
            if not piece:
                raise ConnectionError(f"closed before a whole response; got {self.buf[:200]!r}")
            self.buf += piece

    def close(self) -> None:
        self.sock.close()


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_connections_beyond_the_cap_get_503_and_the_others_keep_working(server):
    idle = [Conn(server, f"127.0.0.{1 + i // 2}") for i in range(6)]  # three clients, within their own cap
    extra = Conn(server, "127.0.0.4")
    try:
        status, body = extra.response()
        assert status == 503 and body["error"]["code"] == "overloaded"
        assert "max_connections=6" in body["error"]["message"]
        idle[0].send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle[0].response()[0] == 200
    finally:
        for c in (*idle, extra):
            c.close()


def test_one_client_cannot_hold_every_connection(server):
    """A security check's: 1030 connections from one client, each dripping a body, held every connection: every
    other client's requests, /healthz too, got 503 for as long as it went on."""
    mine = [Conn(server, "127.0.0.5") for _ in range(3)]
    more = Conn(server, "127.0.0.5")
    other = Conn(server, "127.0.0.6")
    try:
        status, body = more.response()
        assert status == 503 and "max_connections_per_client=3" in body["error"]["message"]
        for c in (mine[0], other):
            c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert c.response()[0] == 200
    finally:
        for c in (*mine, more, other):
            c.close()


def test_a_client_is_its_ipv4_address_or_its_ipv6_64():
    from service.protocol import client_key

    assert client_key(("10.0.0.7", 5000)) == "10.0.0.7"
    assert client_key(("2001:db8::1", 5000, 0, 0)) == client_key(("2001:db8::ffff:2", 6000, 0, 0)) == "2001:db8::/64"
    assert client_key(("2001:db8:0:1::1", 5000, 0, 0)) == "2001:db8:0:1::/64"
    assert client_key(("::ffff:10.0.0.7", 5000, 0, 0)) == "10.0.0.7"  # a dual-stack socket's IPv4 client
    assert client_key(("fe80::1%eth0", 5000, 0, 2)) == "fe80::/64"
    assert client_key("") is None and client_key(None) is None  # a Unix socket


def test_a_body_dripping_in_slower_than_the_floor_gets_408(server):
    """One byte a second never trips the read timeout (a gap of 2 s), but averages far below min_body_rate."""
    slow = Conn(server)
    try:
        slow.send(  # JSON, read whole before it is parsed: spaces are a valid start
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        )
        started = time.monotonic()
        with contextlib.suppress(OSError):  # the answer may come, and the socket close, between two bytes
            for _ in range(20):
                slow.send(b" ")
                time.sleep(1.0)
                if slow.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) if _readable(slow.sock) else b"":
                    break
        status, body = slow.response()
        waited = time.monotonic() - started
        assert status == 408 and f"min_body_rate={MIN_RATE} bytes/s" in body["error"]["message"], body
        assert waited < WRITE_SECONDS + 3, waited  # the read timeout, plus what the few bytes bought
    finally:
        slow.close()


def _readable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])


def test_a_kept_alive_connection_gets_the_head_deadline_again(server):
    c = Conn(server)
    try:
        for _ in range(3):  # a normal client reuses its connection, well within the deadline each time
            c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert c.response()[0] == 200
        started = time.monotonic()
        c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # then trickles a head it never finishes
        status, body = c.response(seconds=HEAD_SECONDS + 10)
        assert status == 408 and body["error"]["code"] == "request_timeout"
        assert HEAD_SECONDS * 0.9 <= time.monotonic() - started < HEAD_SECONDS + 5
    finally:
        c.close()


def test_a_target_in_absolute_form_is_served_as_its_path(server):
    """RFC 9112 3.2.2: a server must accept `GET http://host/path` (what clients send a proxy); it was a 404
    "no route for GET /http://..."."""
    c = Conn(server)
    try:
        c.send(f"GET http://127.0.0.1:{server}/healthz HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, body = c.response()
        assert status == 200 and body["status"] in ("live", "ready"), body
        c.send(b"GET HTTP://example.test/no-such-path?a=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        status, body = c.response()
        assert status == 404 and "no route for GET /no-such-path" in body["error"]["message"], body
    finally:
        c.close()


def test_pipelined_requests_are_answered_in_order(server):
    c = Conn(server)
    try:
        c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2 + b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        assert [c.response()[0] for _ in range(3)] == [200, 200, 404]
    finally:
        c.close()


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


@contextlib.contextmanager
def _posted(server: int, head: bytes, rest: bytes):
    """A POST /classify with these headers, then `rest` on the same connection: (connection, status, body)."""
    c = Conn(server)
    try:
        c.send(b"POST /classify HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n" + rest)
        yield (c, *c.response())
    finally:
        c.close()


def _rest(c: Conn, seconds: float = 5.0) -> bytes:
    """What the server still sends until it closes the connection (a timeout fails the test)."""
    c.sock.settimeout(seconds)
    rest = c.buf
    try:
        while piece := c.sock.recv(65536):
            rest += piece
    except (ConnectionResetError, BrokenPipeError):
        pass
    return rest


def test_an_answer_before_the_body_closes_the_connection_so_the_body_is_not_read_as_a_request(server):
    """An early 413 left the connection open: the body's bytes were parsed as the next request (a 408 later)."""
    for head, status, code in (
        (b"Content-Length: 999999999\r\n", 413, "limit_exceeded"),  # refused from its Content-Length
        (b"Content-Type: a/b\r\nContent-Length: 100\r\n", 415, "unsupported_media_type"),  # before reading it
    ):
        c = Conn(server)
        try:
            c.send(b"POST /classify HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
            got, body = c.response()
            assert got == status and body["error"]["code"] == code
            c.send(b"x" * 100 + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # the body, then a request
            assert _rest(c) == b""  # closed: before, it sat open until a 408 at the head deadline
        finally:
            c.close()


def test_a_body_with_two_framings_is_refused_and_the_connection_closed(server):
    """Both framings at once: a smuggling hazard behind a proxy that frames by Content-Length (RFC 9112 6.3)."""
    head = b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"
    with _posted(server, head, b"0\r\n\r\n" + HEALTHZ) as (c, got, body):
        assert got == 400 and "both Content-Length and Transfer-Encoding" in body["error"]["message"], body
        assert b"HTTP/1.1" not in _rest(c)  # closed, and the GET inside the body never answered


def test_two_framings_and_a_malformed_chunk_get_the_parsers_400_and_log_no_traceback(server):
    """A security check: with the body not valid chunked data, the parser's 400 went out first, then the app's
    own answer to the head failed with "Cannot call write() after write_eof()": two ERROR tracebacks per request,
    any client could cause them. The app's answer is now dropped, as for a client that left."""
    head = b"Content-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n"
    body = b'--XyZ\r\nContent-Disposition: form-data; name="l"\r\n\r\na\r\n--XyZ--\r\n'  # no chunk size line
    chunked = b"Content-Type: multipart/form-data; boundary=XyZ\r\nTransfer-Encoding: chunked\r\n"  # read by the app
    before = len(LOG["server"].read_text())
    for framing in (head, head, chunked, chunked):
        with _posted(server, framing, body) as (c, got, answer):
            assert got == 400 and answer["error"]["code"] == "bad_request", answer
            assert _rest(c) == b""
    time.sleep(0.5)
    log = LOG["server"].read_text()[before:]
    assert "Traceback" not in log and "write_eof" not in log, log[-3000:]
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    conn.request("GET", "/metrics")
    metrics = conn.getresponse().read().decode()
    conn.close()
    counted = [
        line for line in metrics.splitlines() if line.startswith("clipbank_requests_total{") and "/classify" in line
    ]
    assert not any('status="499"' in line for line in counted), counted  # what the client got: the parser's 400


def test_a_compressed_body_is_refused_by_name_and_the_connection_serves_on(server):
    """A gzipped body failed as "not valid JSON: byte 0x8b"."""
    head = b"Content-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n"
    with _posted(server, head, b"{}" + HEALTHZ) as (c, got, body):
        assert got == 415 and "Content-Encoding gzip: send the body uncompressed" in body["error"]["message"], body
        assert c.response()[0] == 200  # its body was read whole: the next request is a request


def test_a_websocket_upgrade_header_is_served_as_plain_http(server):
    c = Conn(server)
    try:
        c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        assert c.response()[0] == 200  # it was a bare 403
    finally:
        c.close()


@pytest.mark.parametrize(
    ("request_bytes", "status", "words"),
    [
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400, "Missing mandatory Host: header (malformed HTTP)"),
        (b"POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, "chunked"),
    ],
)
def test_malformed_http_says_what_the_parser_found(server, request_bytes, status, words):
    """Every such 400 said "Invalid HTTP request received."; a transfer coding h11 lacks is a 501 (RFC 9112)."""
    c = Conn(server)
    try:
        c.send(request_bytes)
        got, body = c.response()
        assert got == status and words in body["error"]["message"], body
    finally:
        c.close()


def test_a_client_that_reads_none_of_a_large_answer_is_dropped(server):
    """A reviewer's: clients that never read their answer held it (and more, as it was encoded) for as long as
    they stayed connected; two held 286 MB for the 100 s measured."""
    import httpx

    from tests.service.images import colour

    labels = [f"{i:04d} " + "x" * 190 for i in range(1000)]  # about 15 MB of answer for 64 images
    files = [("images", (f"{i}.png", colour("red"))) for i in range(64)]
    request = httpx.Request("POST", f"http://127.0.0.1:{server}/classify", files=files, data={"labels": labels})
    head = f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: {request.headers['content-type']}\r\n"
    c = Conn(server)
    try:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # reads nothing: the buffers fill
        c.send(head.encode() + f"Content-Length: {len(request.read())}\r\n\r\n".encode() + request.read())
        deadline = time.monotonic() + 60  # the answer is made (seconds), then waits unread past the deadline
        while time.monotonic() < deadline:
            time.sleep(0.5)
            # read nothing: only look at the connection's TCP state (Linux's tcp_info starts with it)
            if c.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_CLOSE:
                break  # reset by the server, its answer dropped
        else:
            pytest.fail("the server kept an unread answer for 60 s")
    finally:
        c.close()


def test_an_answer_before_the_body_says_it_closes_so_a_strict_client_opens_another(server):
    """`http.client` trusts the headers: it reused the connection the server had closed and failed with
    RemoteDisconnected."""
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    try:
        c.request("POST", "/classify", body=b"x" * 3_000_000, headers={"Content-Type": "text/plain"})
        r = c.getresponse()
        r.read()
        assert r.status == 415 and r.getheader("connection") == "close" and r.will_close
        c.request("GET", "/healthz")  # http.client opens a new connection, as told
        assert c.getresponse().status == 200
    finally:
        c.close()

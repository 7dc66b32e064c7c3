"""Connection-level guards on a real server: a cap on open connections, request-head deadlines, kept-alive reuse."""

from __future__ import annotations

import json
import socket
import time

import pytest

from benchmarks.process import server_process

pytestmark = pytest.mark.slow
HEAD_SECONDS = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("connections")
    env = {
        "CLIPBANK_ADMIN_TOKEN": "connections-token-0123456789",
        "CLIPBANK_FROZEN_RUNTIME": "torch",
        "CLIPBANK_MAX_CONNECTIONS": "4",
        "CLIPBANK_HEAD_TIMEOUT_SECONDS": str(HEAD_SECONDS),
        "CLIPBANK_KEEP_ALIVE_SECONDS": "0.5",
    }
    with server_process(tmp / "store", (), env, tmp / "server.log", ready_seconds=180) as (url, _):
        yield int(url.rsplit(":", 1)[1])


class Conn:
    """A raw HTTP/1.1 connection that reads one response at a time (pipelined ones stay buffered)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
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
    idle = [Conn(server) for _ in range(4)]
    extra = Conn(server)
    try:
        status, body = extra.response()
        assert status == 503 and body["error"]["code"] == "overloaded"
        idle[0].send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle[0].response()[0] == 200
    finally:
        for c in (*idle, extra):
            c.close()


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


def test_pipelined_requests_are_answered_in_order(server):
    c = Conn(server)
    try:
        c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 2 + b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        assert [c.response()[0] for _ in range(3)] == [200, 200, 404]
    finally:
        c.close()

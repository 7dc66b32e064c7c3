"""The client's connections as an integrating app meets them: a fork after first use, a process pool, its own
pool full, a proxy the environment names (found by an outside check of the client)."""

from __future__ import annotations

import json
import os
import pickle
import socket
import threading
import time
from copy import deepcopy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.client import ClipbankClient, ClipbankHTTPError


class _Tasks(BaseHTTPRequestHandler):
    """GET /tasks/NAME answers `{"task": NAME, "versions": [], "port": the client's port}`."""

    protocol_version = "HTTP/1.1"  # kept-alive connections, as a clipbank server keeps them

    def do_GET(self) -> None:  # http.server calls it by this name
        name = self.path.rsplit("/", 1)[-1]
        body = json.dumps({"task": name, "versions": [], "port": self.client_address[1]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Tasks)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_client_used_before_a_fork_makes_its_own_connections_in_the_child(server):
    """The gunicorn --preload pattern: made and used at import, then forked. The child reused the parent's pooled
    socket, so the two processes read each other's answers (an outside check saw a 'bar' image answered 'star')."""
    with ClipbankClient(server) as c:
        parent_port = c.task("first")["port"]
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its answer's port, then out without pytest's teardown
            try:
                os.write(write, str(c.task("child")["port"]).encode())
            finally:
                os._exit(0)
        os.close(write)
        child_port = int(os.read(read, 100) or b"0")
        os.waitpid(pid, 0)
        os.close(read)
        assert child_port and child_port != parent_port  # a connection of its own
        assert c.task("again")["port"] == parent_port  # the parent's own connection serves on


def test_a_client_pickles_as_its_settings(server):
    with ClipbankClient(server, token="tok-123", timeout=7, retries=2, max_connections=3) as c:
        c.task("a")
        assert pickle.dumps(c)  # it pickles (a process pool's worker gets it), as its settings: what a copy is
        copy = deepcopy(c)
    assert (copy.url, copy.timeout, copy.retries, copy.max_connections) == (server, 7, 2, 3)
    assert copy._http.headers["Authorization"] == "Bearer tok-123"
    with copy:
        assert copy.task("b")["task"] == "b"


def test_its_own_pool_full_is_a_timeout_that_says_nothing_was_sent(server):
    """It was `connection_failed` ('broke off'), retried, and a change's message said it may still land."""
    with ClipbankClient(server, timeout=0.5, max_connections=1, retries=3) as c:
        with c._http.stream("GET", "/tasks/held"):  # another thread's answer, still being read
            started = time.monotonic()
            with pytest.raises(ClipbankHTTPError) as e:
                c.task("other")
            assert time.monotonic() - started < 1.5  # once: not retried
    assert e.value.code == "timeout" and "max_connections=1" in e.value.message
    assert "was not sent" in e.value.message and "may still land" not in e.value.message
    with pytest.raises(ValueError, match="max_connections is a count"):
        ClipbankClient(server, max_connections=0)


def test_a_proxy_the_environment_names_is_said_when_the_server_cannot_be_reached(server, monkeypatch):
    """HTTP_PROXY applies to 127.0.0.1 too: a running server was 'unreachable' with no word of the proxy."""
    with socket.socket() as s:  # a port nothing listens on: the proxy refuses
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://user:secret@127.0.0.1:{closed}")
    monkeypatch.setenv("http_proxy", f"http://user:secret@127.0.0.1:{closed}")
    with ClipbankClient(server) as c, pytest.raises(ClipbankHTTPError) as e:
        c.task("a")
    assert e.value.code == "unreachable" and f"through the proxy http://127.0.0.1:{closed}" in e.value.message
    assert "NO_PROXY=127.0.0.1" in e.value.message and "secret" not in e.value.message
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with ClipbankClient(server) as c:
        assert c.task("a")["task"] == "a"


def test_an_async_client_used_by_a_second_asyncio_run_connects_anew_and_a_running_loop_is_refused(server):
    """An outside check: a client made at a script's top level, used in two `asyncio.run`s, failed the second with a
    bare "Event loop is closed" (its kept-alive connection belonged to the first loop)."""
    import asyncio

    from service.client_async import AsyncClipbankClient

    c = AsyncClipbankClient(server)
    assert asyncio.run(c.task("first"))["task"] == "first"
    assert asyncio.run(c.task("second"))["task"] == "second"
    asyncio.run(c.aclose())  # as the docs say to; it closed the first loop's connections from this one: an error
    c = AsyncClipbankClient(server)
    assert asyncio.run(c.task("third"))["task"] == "third"
    started, done = threading.Event(), threading.Event()

    async def hold() -> None:  # a loop in another thread uses the client, and goes on running
        await c.task("held")
        started.set()
        while not done.is_set():
            await asyncio.sleep(0.01)

    other = threading.Thread(target=asyncio.run, args=(hold(),))
    other.start()
    try:
        assert started.wait(10)
        with pytest.raises(
            RuntimeError, match=r"used by another event loop \(running\), .* make one client per event loop"
        ):
            asyncio.run(c.task("third"))
    finally:
        done.set()
        other.join(10)

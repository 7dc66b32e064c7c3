"""`clipbank healthcheck` (the image's HEALTHCHECK): it asks the address the server was started on, whether that
came from its flags, the environment or the defaults, and exits 0 only on a 200 from /readyz."""

from __future__ import annotations

import argparse
import contextlib
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clipbank.cli import main
from clipbank.flags import add_flags
from clipbank.healthcheck import readyz_url, server_argv, server_env
from service.config import ServeConfig


def _parse(args):
    p = argparse.ArgumentParser(add_help=False)
    add_flags(p, ServeConfig, defaults_unset=True)
    return p.parse_known_args(args)[0]


def _proc(tmp_path: Path, pid: int, *argv: str) -> Path:
    (tmp_path / str(pid)).mkdir()
    (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "env", "url"),
    [
        ([], {}, "http://127.0.0.1:8000/readyz"),
        ([], {"CLIPBANK_PORT": "9100", "CLIPBANK_HOST": "0.0.0.0"}, "http://127.0.0.1:9100/readyz"),
        (["--port", "9000"], {"CLIPBANK_PORT": "9100"}, "http://127.0.0.1:9000/readyz"),  # flags win, as in serve
        (["--port=9001", "--host", "::"], {}, "http://[::1]:9001/readyz"),
        (["--host", "10.1.2.3", "--store", "/data/store"], {}, "http://10.1.2.3:8000/readyz"),
        (["--a-flag-of-a-newer-version", "--port", "9002"], {}, "http://127.0.0.1:9002/readyz"),
    ],
)
def test_the_address_is_the_servers_own(monkeypatch, argv, env, url):
    for name in ("CLIPBANK_PORT", "CLIPBANK_HOST"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert readyz_url(argv, _parse) == url


def test_the_server_command_line_is_read_from_proc(tmp_path):
    proc = _proc(tmp_path, 1, "/usr/bin/python3", "/usr/local/bin/clipbank", "serve", "--port", "9000")
    assert server_argv(1, proc) == ["--port", "9000"]
    assert server_argv(2, proc) is None  # no such process: the environment and defaults decide
    other = _proc(tmp_path, 3, "/sbin/tini", "--", "sleep", "1")
    assert server_argv(3, other) is None
    bare = _proc(tmp_path, 4, "/usr/local/bin/clipbank", "serve")
    assert server_argv(4, bare) == []  # a server on its defaults


def test_a_host_servers_own_environment_is_read(tmp_path, monkeypatch):
    """An outside check's: `clipbank healthcheck --pid N` on a host asked port 8000 of a server started with
    CLIPBANK_PORT=18001 in its own environment, and said the address was that process's."""
    proc = _proc(tmp_path, 7, "/usr/local/bin/clipbank", "serve")
    (proc / "7" / "environ").write_bytes(b"PATH=/usr/bin\0CLIPBANK_PORT=18001\0ODD=a=b\0")
    env = server_env(7, proc)
    assert env == {"PATH": "/usr/bin", "CLIPBANK_PORT": "18001", "ODD": "a=b"}
    monkeypatch.setenv("CLIPBANK_PORT", "9100")  # the checker's own, which the server never saw
    assert readyz_url([], _parse, env) == "http://127.0.0.1:18001/readyz"
    assert readyz_url(["--port", "9000"], _parse, env) == "http://127.0.0.1:9000/readyz"  # its flags still win
    assert server_env(8, proc) is None  # unreadable (no such process): this process's environment decides


class _Readyz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/readyz" else 404)
        body = b'{"error": {"code": "not_ready", "message": "the server is still loading"}}'
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def readyz() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Readyz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_exit_code_follows_readyz(readyz, monkeypatch, capsys):
    port = readyz.server_address[1]
    monkeypatch.setenv("CLIPBANK_PORT", str(port))
    monkeypatch.delenv("CLIPBANK_HOST", raising=False)
    monkeypatch.delenv("CLIPBANK_URL", raising=False)
    assert main(["healthcheck", "--pid", "999999999"]) == 0  # no such process: CLIPBANK_PORT says where
    out = capsys.readouterr().out  # and says so: on a host, PID 1 is init, not the server
    assert f"127.0.0.1:{port}/readyz: 200 (process 999999999 is not a clipbank serve: the address is " in out
    # a script on a host that set the clients' CLIPBANK_URL (an outside check's polled :8000 instead)
    monkeypatch.setenv("CLIPBANK_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CLIPBANK_PORT", "1")
    assert main(["healthcheck", "--pid", "999999999"]) == 0
    said = f"http://127.0.0.1:{port}/readyz: 200 (CLIPBANK_URL's: process 999999999 is not a clipbank serve)\n"
    assert capsys.readouterr().out == said
    monkeypatch.setenv("CLIPBANK_URL", "http://[::1")  # the review's: a URL that does not parse is exit 1 too
    assert main(["healthcheck", "--pid", "999999999"]) == 1
    assert "the server's address is unknown: Invalid IPv6 URL (CLIPBANK_URL's" in capsys.readouterr().err
    monkeypatch.delenv("CLIPBANK_URL")
    monkeypatch.setenv("CLIPBANK_PORT", str(port))
    for base in (f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/"):  # the base URL, as other commands take
        assert main(["healthcheck", "--url", base]) == 0, base
        assert capsys.readouterr().out == f"http://127.0.0.1:{port}/readyz: 200\n"
    _Readyz.status = 503
    try:
        assert main(["healthcheck", "--url", f"http://127.0.0.1:{port}/readyz"]) == 1  # loading, or stopping
    finally:
        _Readyz.status = 200
    assert "readyz: 503 (not_ready: the server is still loading)" in capsys.readouterr().err  # why, not only 503
    readyz.shutdown()
    readyz.server_close()
    assert main(["healthcheck", "--url", f"http://127.0.0.1:{port}/readyz", "--timeout", "1"]) == 1
    assert "refused" in capsys.readouterr().err.lower()  # a failure on stderr, as other commands say theirs


def test_only_a_200_from_readyz_itself_is_ready(readyz, monkeypatch, capsys):
    """A redirect is not followed (its target's 200 said nothing of /readyz); no proxy of the environment is
    asked (a container's HTTP_PROXY, set for downloads, answered for a server that was down)."""
    port = readyz.server_address[1]
    _Readyz.status = 307
    try:
        assert main(["healthcheck", "--url", f"http://127.0.0.1:{port}/readyz"]) == 1
    finally:
        _Readyz.status = 200
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")  # a "proxy" that answers 200 to anything
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        down = closed.getsockname()[1]
    assert main(["healthcheck", "--url", f"http://127.0.0.1:{down}/readyz"]) == 1
    assert "refused" in capsys.readouterr().err.lower()


@pytest.fixture
def raw_server() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP server answering each connection with the byte strings of `replies` (one every 0.5 s), then closing."""
    listener = socket.create_server(("127.0.0.1", 0))
    replies: list[bytes] = []
    stop = threading.Event()

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                for chunk in replies:
                    if stop.wait(0.5):
                        break
                    with contextlib.suppress(OSError):
                        conn.sendall(chunk)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], replies
    stop.set()
    thread.join(5)
    listener.close()


@pytest.mark.parametrize(
    ("replies", "seen"),
    [
        ([b"HTTP/1.1 200 OK\r\n"] + [b"X: y\r\n"] * 20, "no whole answer within 1 s"),  # trickled: not ready
        ([b"SSH-2.0-OpenSSH\r\n"], "BadStatusLine"),  # not HTTP: one line, no traceback
    ],
)
def test_a_server_that_trickles_or_is_not_http_is_not_ready(raw_server, capsys, replies, seen):
    port, sent = raw_server
    sent.extend(replies)
    start = time.monotonic()
    assert main(["healthcheck", "--url", f"http://127.0.0.1:{port}/readyz", "--timeout", "1"]) == 1
    assert time.monotonic() - start < 3
    assert seen in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "env", "seen"),
    [
        (["--timeout", "0"], {}, "the timeout must be in"),
        (["--timeout", "inf"], {}, "the timeout must be in"),
        (["--url", "http://127.0.0.1:1:x/readyz"], {}, "Port could not be cast"),
        (["--url", "http://127.0.0.1 x/readyz"], {}, "InvalidURL"),
        (["--pid", "999999999"], {"CLIPBANK_PORT": "abc"}, "the server's address is unknown"),
    ],
)
def test_bad_settings_exit_1_with_one_line(monkeypatch, capsys, argv, env, seen):
    """Exit 2 is Docker's "reserved" code: a health check only ever says 0 (ready) or 1 (not)."""
    monkeypatch.delenv("CLIPBANK_URL", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["healthcheck", *argv]) == 1
    out = capsys.readouterr()
    assert seen in out.err and "Traceback" not in out.err


@pytest.mark.parametrize("argv", [["--timeout", "abc"], ["--pid", "x"], ["--no-such-flag"]])
def test_a_usage_error_is_exit_1_too(capsys, argv):
    """An outside check: `healthcheck --timeout abc` was argparse's exit 2, which Docker reserves."""
    with pytest.raises(SystemExit) as e:
        main(["healthcheck", *argv])
    assert e.value.code == 1 and "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # the review's: a task or file named healthcheck is no health check
        main(["-v", "tasks", "activate", "healthcheck", "abc"])
    assert e.value.code == 2

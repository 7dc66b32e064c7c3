"""`clipbank healthcheck` (the image's HEALTHCHECK): it asks the address the server was started on, whether that
came from its flags, the environment or the defaults, and exits 0 only on a 200 from /readyz."""

from __future__ import annotations

import argparse
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from clipbank.cli import main
from clipbank.flags import add_flags
from clipbank.healthcheck import readyz_url, server_argv
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
    assert server_argv(2, proc) == []  # no such process: the environment and defaults decide
    other = _proc(tmp_path, 3, "/sbin/tini", "--", "sleep", "1")
    assert server_argv(3, other) == []


class _Readyz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.end_headers()

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
    assert main(["healthcheck", "--pid", "999999999"]) == 0  # no such process: CLIPBANK_PORT says where
    assert f"127.0.0.1:{port}/readyz: 200" in capsys.readouterr().out
    _Readyz.status = 503
    try:
        assert main(["healthcheck", "--url", f"http://127.0.0.1:{port}/readyz"]) == 1  # loading, or stopping
    finally:
        _Readyz.status = 200
    assert "503" in capsys.readouterr().out
    readyz.shutdown()
    readyz.server_close()
    assert main(["healthcheck", "--url", f"http://127.0.0.1:{port}/readyz", "--timeout", "1"]) == 1
    assert "refused" in capsys.readouterr().out.lower()

"""A benchmark's servers do not outlive it: SIGTERM to `clipbank bench ...` stops them on the way out."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_to_a_benchmark_stops_the_server_it_started(tmp_path):
    (tmp_path / "readyz").write_text("ok")  # a static server answers GET /readyz with 200
    port = _free_port()
    script = textwrap.dedent(
        f"""
        import signal, sys, time
        from clipbank.cli import _terminate
        from benchmarks.process import command_process
        signal.signal(signal.SIGTERM, _terminate)  # what `clipbank` installs for every command but serve
        cmd = [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1", "--directory", {str(tmp_path)!r}]
        try:
            with command_process(cmd, {port}) as (url, pid):
                print(pid, flush=True)
                time.sleep(60)
        except KeyboardInterrupt:
            sys.exit(130)
        """
    )
    bench = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    server = int(bench.stdout.readline())
    os.kill(bench.pid, signal.SIGTERM)
    assert bench.wait(30) == 130
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(server, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(server, signal.SIGKILL)
    raise AssertionError("the benchmark's server outlived it")

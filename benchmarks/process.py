"""Run `clipbank serve` as a child process and wait until it is ready (for end-to-end tests and benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx


def peer_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The thread settings `clipbank serve` gives itself (`service.threads.SERVING_ENV`: OpenMP workers sleep
    between regions), for a peer server too, where this process's environment does not set them: side by side,
    every server runs under the same ones. Spinning workers made a peer 100-500x slower beside any other busy
    process (an outside check: 1.9 images/s against 141), a figure no ratio should rest on. `env` wins."""
    from service.threads import SERVING_ENV

    return {**{k: v for k, v in SERVING_ENV.items() if k not in os.environ}, **(env or {})}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(
    store: Path,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    log: Path | None = None,
    ready_seconds: float = 600,
) -> Iterator[tuple[str, int]]:
    """Start `clipbank serve` on a free port; yield (url, pid) once /readyz is 200; SIGTERM it afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "clipbank.cli", "serve", "--store", str(store), "--port", str(port), *args]
    with command_process(cmd, port, env, log, ready_seconds) as running:
        yield running


@contextmanager
def command_process(
    cmd: Sequence[str], port: int, env: dict[str, str] | None = None, log: Path | None = None, ready_seconds=600.0
) -> Iterator[tuple[str, int]]:
    """Run a server command that listens on 127.0.0.1:`port`; yield (url, pid) once its /readyz is 200."""
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # closed below
    # its own process group, signalled whole: a server may run worker processes (LitServe does), which must not
    # outlive it
    proc = subprocess.Popen(
        cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, ready_seconds, log)
        yield url, proc.pid
    finally:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        if _signal_group(proc.pid, 0):  # workers left: give them their own shutdown, then make sure of it
            time.sleep(0.5)
            _signal_group(proc.pid, signal.SIGKILL)
        if log is not None:
            out.close()


def _signal_group(pid: int, sig: int) -> bool:
    """Send `sig` to the process group `pid`; False if no process of it is left."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _wait_ready(proc: subprocess.Popen, url: str, seconds: float, log: Path | None) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            raise ChildProcessError(f"the server exited with code {proc.returncode}\n{_tail(log)}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server was not ready within {seconds} s\n{_tail(log)}")
        time.sleep(0.2)


def _tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-3000:] if log is not None else ""


@contextmanager
def tree_server(tree: str | None, env: dict[str, str], prefix: str) -> Iterator[str]:
    """`clipbank serve` run from the source tree `tree` (this one when None: an older checkout is measured beside
    it), on a fresh store in a temporary folder; yields its URL once ready."""
    import tempfile

    env = {**env, **({"PYTHONPATH": tree, "PYTHONSAFEPATH": "1"} if tree else {})}  # not the working folder's code
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    with server_process(folder / "store", (), env, folder / "server.log", ready_seconds=300) as (url, _):
        yield url

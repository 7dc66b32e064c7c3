"""`clipbank healthcheck`: exit 0 when the `clipbank serve` in this container answers /readyz with 200, else 1.

A container's health check runs beside the server, with the same environment but not its flags: the image's
command may be `serve --port 9000`. So the address is read from the server's own command line
(`/proc/PID/cmdline`, PID 1 in a container) and parsed as `clipbank serve` parses it, then its environment
(`CLIPBANK_HOST`, `CLIPBANK_PORT`, from `/proc/PID/environ`; this process's own when that cannot be read or the
process is no `clipbank serve`), then the defaults. A server bound to every address (0.0.0.0, ::) is asked on
loopback. One plain GET with the standard library's `http.client`: no proxy from the environment (a container's
`HTTP_PROXY`, set for downloads, must not answer for the server), no redirect followed, and one deadline for the
whole check (a server that trickles its answer is not ready). Exit 2 is Docker's "reserved": never used here.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import math
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from service.config import ServeConfig

from .flags import given

ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
MAX_TIMEOUT = 3600.0


def server_argv(pid: int, proc: Path = Path("/proc")) -> list[str] | None:
    """The arguments after `serve` in process `pid`'s command line; None when it is not a `clipbank serve` (or
    cannot be read)."""
    try:
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    words = [w.decode(errors="replace") for w in argv if w]
    return words[words.index("serve") + 1 :] if "serve" in words else None


def server_env(pid: int, proc: Path = Path("/proc")) -> dict[str, str] | None:
    """Process `pid`'s environment (`/proc/PID/environ`), or None when it cannot be read (another user's)."""
    try:
        raw = (proc / str(pid) / "environ").read_bytes()
    except (OSError, ValueError):
        return None
    pairs = (w.decode(errors="replace").partition("=") for w in raw.split(b"\0") if w)
    return {name: value for name, _, value in pairs}


def readyz_url(
    serve_args: Sequence[str],
    parse: Callable[[Sequence[str]], argparse.Namespace],
    env: Mapping[str, str] | None = None,
) -> str:
    """The /readyz URL of a server started with `serve_args`, as `parse` (the serve subcommand's parser) reads
    them, with `env` (default: this process's environment) and the defaults behind them. ValueError when the
    environment does not parse."""
    with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage text would only confuse a health log
        try:
            args = parse(list(serve_args))
        except SystemExit:  # flags this version cannot read: the environment and defaults still say something
            args = parse([])
    config = ServeConfig.from_env(env, **given(ServeConfig, args))
    host = ANY_ADDRESS.get(config.host, config.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{config.port}/readyz"


def _get(url: str, timeout: float) -> tuple[bool, str]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return False, f"{url}: not an http:// URL"
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/", headers={"Connection": "close"})
        response = conn.getresponse()
        if response.status == 200:  # the status line and headers only: the body says nothing more
            return True, f"{url}: 200"
        return False, f"{url}: {response.status}{_reason(response.read(4096))}"  # why: still loading, a failed start
    finally:
        conn.close()


def _reason(body: bytes) -> str:
    """A clipbank error body's code and message, as ` (code: message)`; '' for anything else."""
    try:
        error = json.loads(body)["error"]
        return f" ({error['code']}: {' '.join(str(error['message']).split())[:300]})"
    except (ValueError, KeyError, TypeError):
        return ""


def check(url: str, timeout: float) -> tuple[bool, str]:
    """(ready, what was seen) for one GET of `url`, all of it within `timeout` seconds."""
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT):
        return False, f"the timeout must be in (0, {MAX_TIMEOUT:g}] seconds, got {timeout}"
    seen: list[tuple[bool, str]] = []

    def run() -> None:
        try:
            seen.append(_get(url, timeout))
        except Exception as e:  # refused, reset, not HTTP, a bad URL: all say "not ready"
            seen.append((False, f"{url}: {type(e).__name__}: {e}"))

    worker = threading.Thread(target=run, name="clipbank-healthcheck", daemon=True)
    worker.start()
    worker.join(timeout)
    return seen[0] if seen else (False, f"{url}: no whole answer within {timeout:g} s")

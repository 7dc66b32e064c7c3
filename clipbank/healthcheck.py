"""`clipbank healthcheck`: exit 0 when the `clipbank serve` in this container answers /readyz with 200.

A container's health check runs beside the server, with the same environment but not its flags: the image's
command may be `serve --port 9000`. So the address is read from the server's own command line
(`/proc/PID/cmdline`, PID 1 in a container) and parsed as `clipbank serve` parses it, then the environment
(`CLIPBANK_HOST`, `CLIPBANK_PORT`), then the defaults. A server bound to every address (0.0.0.0, ::) is asked on
loopback. Standard library only: it runs every 30 s.
"""

from __future__ import annotations

import argparse
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from service.config import ServeConfig

from .flags import given

ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def server_argv(pid: int, proc: Path = Path("/proc")) -> list[str]:
    """The arguments after `serve` in process `pid`'s command line; [] when it is not a `clipbank serve` (or
    cannot be read)."""
    try:
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return []
    words = [w.decode(errors="replace") for w in argv if w]
    return words[words.index("serve") + 1 :] if "serve" in words else []


def readyz_url(serve_args: Sequence[str], parse: Callable[[Sequence[str]], argparse.Namespace]) -> str:
    """The /readyz URL of a server started with `serve_args`, as `parse` (the serve subcommand's parser) reads
    them, with the environment and defaults behind them."""
    try:
        args = parse(list(serve_args))
    except SystemExit:  # flags this version does not know: the environment and defaults still say something
        args = parse([])
    config = ServeConfig.from_env(**given(ServeConfig, args))
    host = ANY_ADDRESS.get(config.host, config.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{config.port}/readyz"


def check(url: str, timeout: float) -> tuple[bool, str]:
    """(ready, what was seen) for one GET of `url`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200, f"{url}: {r.status}"
    except urllib.error.HTTPError as e:
        return False, f"{url}: {e.code}"
    except (OSError, ValueError) as e:
        return False, f"{url}: {e}"

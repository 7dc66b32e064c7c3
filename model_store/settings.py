"""Where clipbank's settings come from: the one reader of `CLIPBANK_*` environment variables, and `option`, a
dataclass field that carries the help text the command line shows (`clipbank/flags.py` turns config classes
into flags, so a setting is declared once)."""

from __future__ import annotations

import math
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Any

from .errors import StoreError

ENV_PREFIX = "CLIPBANK_"


def env_value(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """`$CLIPBANK_<NAME>`, or None when it is unset or empty."""
    environ = os.environ if environ is None else environ
    return environ.get(ENV_PREFIX + name.upper()) or None


def cache_root(environ: Mapping[str, str] | None = None) -> str:
    """`$XDG_CACHE_HOME/clipbank`, else `~/.cache/clipbank`."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "clipbank")


def option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with a default and the help text of its command-line flag."""
    return field(default=default, metadata={"help": help, "choices": choices})


def check_settings(job: object, positive: tuple[str, ...], counts: tuple[str, ...] = ()) -> None:
    """ValueError naming a setting that is given and not a finite number > 0 (`counts`: >= 0), or an `out` that
    is a file: these used to mean the default, skip a phase silently, or fail after the run."""
    for name in (*positive, *counts):
        value = getattr(job, name)
        least = 0 if name in counts else math.nextafter(0, 1)
        if value is not None and not (least <= value < math.inf):
            raise ValueError(
                f"--{name.replace('_', '-')} must be a finite number {'>=' if name in counts else '>'} 0, got {value}"
            )
    out = getattr(job, "out", None)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file; the report goes into a folder")


def check_s3_endpoint(endpoint: str | None) -> None:
    """`CLIPBANK_S3_ENDPOINT_URL`, refused by name before boto3 sees it ("Invalid endpoint", after the backbone had
    loaded), and never with credentials in it: every error about the endpoint would log them."""
    if endpoint is None:
        return
    if "@" in endpoint:  # checked first: the URL is not shown then
        raise StoreError(
            "CLIPBANK_S3_ENDPOINT_URL holds credentials (user:password@): they would be logged with every error "
            "about the endpoint; give them in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise StoreError(f"CLIPBANK_S3_ENDPOINT_URL must be an http:// or https:// URL, got {endpoint[:200]!r}")

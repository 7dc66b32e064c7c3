"""Where clipbank's settings come from: the one reader of `CLIPBANK_*` environment variables, and `option`, a
dataclass field that carries the help text the command line shows (`clipbank/flags.py` turns config classes
into flags, so a setting is declared once)."""

from __future__ import annotations

import functools
import math
import numbers
import operator
import os
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import field, fields
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


def is_bool(value: Any) -> bool:
    """True or False, or numpy's bool (a scalar, or an array of no dimension)."""
    numpy_bool = getattr(getattr(value, "dtype", None), "kind", None) == "b" and getattr(value, "shape", None) == ()
    return value is True or value is False or numpy_bool


@functools.cache
def _scalar_fields(cls: type) -> dict[str, tuple[type, bool]]:
    """The bool, int and float fields of a config class: name -> (type, whether None is allowed)."""
    found, names = {}, {f.name for f in fields(cls)}
    for name, hint in typing.get_type_hints(cls).items():
        if name not in names:
            continue
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1 and kinds[0] in (bool, int, float):
            found[name] = (kinds[0], len(kinds) < len(args))
    return found


def field_type_problems(config: Any) -> list[str]:
    """A config dataclass's bool, int and float fields checked for their type, each problem naming its field
    (`lr="0.01"` failed with "'<' not supported between instances of 'int' and 'str'"). Numpy's numbers are
    taken, as Python's (`steps=np.int64(100)` from a notebook's arithmetic); an int is a float's value too."""
    problems = []
    for name, (kind, optional) in _scalar_fields(type(config)).items():  # per request for a ClassifyItem: cached
        value = getattr(config, name)
        if value is None and optional:
            continue
        try:
            if kind is bool:
                if not is_bool(value):
                    raise TypeError
                value = bool(value)
            elif kind is int and isinstance(value, float) and value.is_integer():
                value = int(value)  # 64e6 bytes, 64.0 images: taken before these checks, and still
            elif isinstance(value, bool) or not isinstance(value, numbers.Real if kind is float else numbers.Integral):
                raise TypeError
            elif type(value) not in (int, float):  # numpy's: plain Python numbers from here on
                value = float(value) if kind is float else operator.index(value)
        except TypeError:
            what = {bool: "True or False", int: "an integer", float: "a number"}[kind]
            problems.append(f"{name} must be {what}, got {type(value).__name__} {value!r:.40}")
            continue
        object.__setattr__(config, name, value)  # config classes are frozen dataclasses
    return problems


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

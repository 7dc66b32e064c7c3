"""Command-line flags made from config dataclasses, so each setting is declared once: its name, type, default
and help live in its config class (`model_store.settings.option`), and the command line follows."""

from __future__ import annotations

import argparse
import os
import types
import typing
from dataclasses import MISSING, Field, fields
from typing import Any


def _scalar(hint: Any) -> type:
    """int, float, str or bool, from `X` or `X | None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if hint not in (int, float, str, bool):
        raise TypeError(f"no flag for a field of type {hint!r}")
    return hint


def _help(f: Field, shown_default: Any) -> str:
    text = f.metadata.get("help", "")
    if shown_default not in (None, MISSING, "") and not isinstance(shown_default, bool):
        text += f" (default {shown_default})"
    return text.replace("%", "%%")


def flag_fields(cls: type) -> list[Field]:
    """The fields of `cls` that are flags: those declared with help text."""
    return [f for f in fields(cls) if "help" in f.metadata]


def add_flags(parser: argparse.ArgumentParser, cls: type, *, defaults_unset: bool = False) -> None:
    """One `--field-name` flag per field of `cls` that has help text.

    A field without a default is a required flag; a bool field is a switch (`--name`, or `--no-name` when it
    defaults to True). With `defaults_unset`, flags default to None so that a later layer (environment
    variables, then the config's own default) fills what was not given; the help still shows the default.
    """
    hints = typing.get_type_hints(cls)
    for f in flag_fields(cls):
        kind, flag = _scalar(hints[f.name]), "--" + f.name.replace("_", "-")
        if kind is bool:
            unset = {"default": None} if defaults_unset else {}
            if f.default:
                parser.add_argument(
                    "--no-" + flag[2:], dest=f.name, action="store_false", help="do not " + _help(f, None), **unset
                )
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=_help(f, None), **unset)
            continue
        choices = f.metadata.get("choices")
        parser.add_argument(
            flag,
            dest=f.name,
            type=str.lower if choices and kind is str else kind,  # `--log-level INFO` as the variable takes it
            required=f.default is MISSING,
            default=None if defaults_unset or f.default is MISSING else f.default,
            choices=choices,
            help=_help(f, f.default),
        )


def given(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The values of `cls`'s flags in `args` (None where a flag defaulting to unset was not given)."""
    return {f.name: getattr(args, f.name) for f in flag_fields(cls) if hasattr(args, f.name)}


class UsageError(SystemExit):
    """A command given flags that do not go together: its message on stderr and exit status 2, as argparse
    gives for a flag it cannot read (a bare `SystemExit("...")` exits 1)."""

    def __init__(self, message: str) -> None:
        import sys

        print(message, file=sys.stderr)
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


READ_TOKENS = ("classify_token", "admin_token")  # /classify takes either
READ_TOKEN_HELP = "$CLIPBANK_CLASSIFY_TOKEN, else $CLIPBANK_ADMIN_TOKEN (or the file each one's _FILE variable names)"
ADMIN_TOKEN_HELP = (
    "admin token (default $CLIPBANK_ADMIN_TOKEN, or the file $CLIPBANK_ADMIN_TOKEN_FILE names; prefer them: a flag "
    "shows in ps)"
)


DEFAULT_TIMEOUT = 60.0
TIMEOUT_HELP = (
    "seconds a client command waits for each step of a request: connecting, sending, each read of the answer "
    f"($CLIPBANK_TIMEOUT, default {DEFAULT_TIMEOUT:g})"
)


def seconds(text: str) -> float:
    """A positive, finite number of seconds (a flag's or `$CLIPBANK_TIMEOUT`'s value)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):  # nan fails both
        raise argparse.ArgumentTypeError(f"a number of seconds > 0 is needed, got {text!r}")
    return value


def add_timeout(parser: argparse.ArgumentParser, default: Any = None) -> None:
    parser.add_argument("--timeout", type=seconds, default=default, metavar="SECONDS", help=TIMEOUT_HELP)


def command_timeout(args: argparse.Namespace) -> float:
    """`--timeout`, else `$CLIPBANK_TIMEOUT`, else 60 s (an outside check's CI could not shorten the 60 s)."""
    given = getattr(args, "timeout", None)
    if given is not None:
        return given
    raw = os.environ.get("CLIPBANK_TIMEOUT", "").strip()
    try:
        return seconds(raw) if raw else DEFAULT_TIMEOUT
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"CLIPBANK_TIMEOUT: {e}") from None


def command_token(given: str | None, *names: str) -> str | None:
    """The token a client command sends: `--token` when given, else the first of `names` (e.g. "classify_token")
    set as `$CLIPBANK_<NAME>` or in the file `$CLIPBANK_<NAME>_FILE` names (a mounted secret), read as the server
    reads them; a ValueError (a usage error) names a file that cannot be read, or both forms set."""
    if given is not None:
        return given
    from model_store.settings import ENV_PREFIX
    from service.token_files import SENDABLE_TOKEN, token_variable

    for name in names:
        problems: list[str] = []
        token = (token_variable(name, os.environ, problems) or "").strip()
        if problems:
            raise ValueError(problems[0])
        if not token:  # an empty variable is unset, as before
            continue
        source = f"{ENV_PREFIX}{name.upper()}_FILE"
        if source in os.environ and not SENDABLE_TOKEN.fullmatch(token):  # named: the client's error would not
            raise ValueError(
                f"{source}={os.environ[source]!r} does not hold a token alone: a token is printable ASCII without "
                "spaces (the file is not shown here)"
            )
        return token
    return None


LARGEST_VERSION = 2**31 - 1  # model_store.manifest.MAX_VERSION (which imports torch: not read here)


def version_number(text: str) -> int:
    """An argparse type: a bundle version, 1 to LARGEST_VERSION (20 digits were sent, and refused as bad JSON)."""
    try:
        version = int(text)
    except ValueError:
        version = 0
    if not 1 <= version <= LARGEST_VERSION:
        raise argparse.ArgumentTypeError(f"a version is a whole number from 1 to {LARGEST_VERSION}, got {text!r}")
    return version

"""Tokens read from files: `CLIPBANK_ADMIN_TOKEN_FILE` (and `CLIPBANK_CLASSIFY_TOKEN_FILE`) name a file holding
the token, as Docker and Kubernetes secrets are mounted, so the token is in no environment that `docker
inspect`, `docker compose config` or a process listing shows."""

from __future__ import annotations

import re
from collections.abc import Mapping

from model_store.files import open_regular
from model_store.settings import ENV_PREFIX

SENDABLE_TOKEN = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: what an Authorization header carries
MAX_TOKEN_FILE_BYTES = 4096  # a token is tens of characters; a mistaken path to a large file is refused


def token_variable(name: str, env: Mapping[str, str], problems: list[str]) -> str | None:
    """The raw value of token setting `name` (e.g. "admin_token"): its variable, else the content of the file its
    `_FILE` variable names; None when neither is set. A problem (both set, a file that cannot be read) is added to
    `problems` and gives None."""
    variable = ENV_PREFIX + name.upper()
    path = env.get(variable + "_FILE")
    if path is None:
        return env.get(variable)
    if variable in env:
        problems.append(f"{variable} and {variable}_FILE are both set: set one of them")
        return None
    try:
        with open_regular(path) as f:  # a pipe or a folder in its place is refused, not waited on
            data = f.read(MAX_TOKEN_FILE_BYTES + 1)
        if len(data) > MAX_TOKEN_FILE_BYTES:
            raise ValueError(f"it is over {MAX_TOKEN_FILE_BYTES} bytes; it should hold the token alone")
        if not (text := data.decode()).strip():
            raise ValueError("it is empty")
        return text
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        problems.append(f"{variable}_FILE={path!r} cannot be read: {e}")
        return None

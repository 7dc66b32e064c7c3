"""The admin token a server uses when none is set: read from the store folder, else generated and saved there
(mode 600), so restarts and servers sharing the store keep one token; and when it may be printed."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import sys
import time
from pathlib import Path

from model_store.files import read_regular

from .config import ServeConfig
from .token_files import SENDABLE_TOKEN

log = logging.getLogger("clipbank.service")
ADMIN_TOKEN_FILE = ".admin-token"
TOKEN_TEMP = re.compile(re.escape(ADMIN_TOKEN_FILE) + r"\.[0-9a-f]{8}")  # a token being saved: ADMIN_TOKEN_FILE.<hex>
CONTAINER_MARKS = ("/.dockerenv", "/run/.containerenv")  # files Docker and Podman put in a container


def on_a_terminal() -> bool:
    """Whether stderr is a person's terminal, not a log: a container's terminal (`docker run -t`, compose `tty:
    true`, a pod's `tty: true`) is captured into `docker logs` or `kubectl logs` (an outside check found the token
    there), so it never counts."""
    container = any(os.environ.get(v) for v in ("container", "KUBERNETES_SERVICE_HOST"))  # Podman/systemd; a pod
    container = container or any(os.path.exists(p) for p in CONTAINER_MARKS)
    return sys.stderr.isatty() and not container


def resolve_admin_token(config: ServeConfig) -> tuple[str, str]:
    """(token, where it came from). Unset: the one saved in the store folder, else a new one saved there, so a
    restart keeps the token its clients have (servers sharing the store share it too)."""
    path = Path(config.store) / ADMIN_TOKEN_FILE
    _sweep_token_temps(path)  # a server killed while saving one left it, whether this one sets its own or not
    if config.admin_token:
        with contextlib.suppress(OSError, UnicodeDecodeError):  # an object store, no such file: nothing to say
            if path.is_file() and path.read_text().strip() != config.admin_token:
                log.warning(
                    "the admin token is set (CLIPBANK_ADMIN_TOKEN), so the other one saved in %s "
                    "by an earlier start without it is not accepted here; servers sharing the store without the "
                    "setting use that one: set the same token on every server (or delete the file)",
                    path,
                )
        return config.admin_token, "set"
    try:
        token = read_regular(path).decode().strip()  # a pipe in its place hung the start
        if len(token) >= 16 and SENDABLE_TOKEN.fullmatch(token):
            if path.stat().st_mode & 0o077:  # an outside check's copy (mode 644) was used without a word
                log.warning("%s can be read by other users of this machine: `chmod 600 %s`", path, path)
            return token, f"read from {path}"
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as e:
        log.warning("cannot read %s: %s", path, e)
    token = secrets.token_urlsafe(24)
    tmp = path.with_name(f"{ADMIN_TOKEN_FILE}.{secrets.token_hex(4)}")  # TOKEN_TEMP
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())  # a crash must not leave an empty token file behind the link
        try:
            os.link(tmp, path)  # fails if another server saved one first: use theirs
        except FileExistsError:
            theirs = read_regular(path).decode(errors="replace").strip()
            if len(theirs) >= 16 and SENDABLE_TOKEN.fullmatch(theirs):
                return theirs, f"read from {path}"
            # empty, too short or unsendable (a damaged or hand-written file): no client could use it
            os.replace(tmp, path)
            log.warning(
                "the admin token saved in %s was %s: replaced",
                path,
                "shorter than 16 characters"
                if len(theirs) < 16
                else "not printable ASCII without spaces (no client could send it)",
            )
        return token, f"generated and saved to {path} (mode 600)"
    except OSError as e:
        return token, f"generated, not saved ({e}): it changes at the next start"
    finally:
        with contextlib.suppress(OSError):  # a store path under a file cannot hold it either (ENOTDIR)
            tmp.unlink(missing_ok=True)


def _sweep_token_temps(path: Path, older_than: float = 60.0) -> None:
    """Delete the temp files (each holding a token) that a server killed while saving its token left behind; a
    minute old at least, so never another server's that is saving its own right now."""
    cutoff = time.time() - older_than
    with contextlib.suppress(OSError):  # no folder yet, or an object store: nothing to sweep
        for tmp in path.parent.glob(f"{ADMIN_TOKEN_FILE}.*"):
            if TOKEN_TEMP.fullmatch(tmp.name):
                with contextlib.suppress(OSError):
                    if tmp.lstat().st_mtime < cutoff:
                        tmp.unlink()
                        log.info("deleted %s, left by a server killed while saving its admin token", tmp)

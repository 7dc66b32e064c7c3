"""Reading a store's files: only regular files. A FIFO where a blob or the index should be hung every reader
(`open` waits for a writer that never comes: `clipbank store check` and a server's start, for ever), and a folder
failed only at the read; both are now an OSError naming the path, which the readers report as unreadable."""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`path` open for reading, or OSError when it is not a regular file (opened without waiting, then checked)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # POSIX; elsewhere no FIFO opens this way
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise OSError(errno.EISDIR, "Is a directory", os.fspath(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file (a pipe, a socket or a device)", os.fspath(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike) -> bytes:
    """The bytes of the regular file at `path` (OSError for anything else: see `open_regular`)."""
    with open_regular(path) as f:
        return f.read()

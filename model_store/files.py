"""A store's files. Reading only regular files: a FIFO where a blob or the index should be hung every reader
(`open` waits for a writer that never comes: `clipbank store check` and a server's start, for ever), and a folder
failed only at the read; both are now an OSError naming the path, which the readers report as unreadable.
Writing whole files or nothing (`atomic_write`)."""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("clipbank.store")
TMP_PREFIX = ".tmp-"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
EXISTS = "the file was made by something else while this one was written"


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without setting it (os.umask sets it, which other threads could observe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write(path: Path, data: bytes, exclusive: bool = False) -> None:
    """Write temp, fsync, rename, fsync the folder: readers see the old file or the new one, never a part. The
    file gets the mode a plain `open` would give it (0666 less the umask): a temp file is private to its writer,
    and a store shared by a group, or changed by an operator for a server running as another user, must stay
    readable. `exclusive`: `FileExistsError` if `path` exists when the data is published, checked by the rename
    itself (an outside check: a file made at `train --out`'s path while it trained was replaced, unsaid)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    except OSError as e:
        if e.errno in NO_SPACE:  # named as the file being written: the temp name was never made (no free inodes)
            e.filename = str(path)
        raise
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path, exclusive)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:  # a full disk names no file
            e.filename = str(path)
        raise
    try:
        _fsync_dir(path.parent)
    except OSError as e:  # the rename is done: the change is published, only its durability is in doubt
        log.warning("%s was written, but syncing its folder failed: %s", path, e)


def _publish(tmp: str, path: Path, exclusive: bool) -> None:
    """Rename `tmp` to `path`; `exclusive`: only where no file is (a hard link fails on an existing name; a file
    system without hard links is checked just before a plain rename)."""
    if not exclusive:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, EXISTS, str(path)) from None
    except OSError as e:
        if e.errno not in NO_LINKS:
            raise
        if path.exists():
            raise FileExistsError(errno.EEXIST, EXISTS, str(path)) from None
        os.replace(tmp, path)
        return
    try:  # published: a temp name left behind is no failure of the write (the next writer's sweep removes it)
        os.unlink(tmp)
    except OSError as e:
        log.warning("%s was written, but its temp file %s could not be removed: %s", path, tmp, e)


# a file system without hard links (FUSE mounts such as gcsfuse and mountpoint-s3 say ENOSYS): a check, then a rename
NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS)

"""The local bundle store: immutable blobs plus one index file, changed atomically under a process-safe lock;
and `open_store`, which picks the backend a location names (a folder, or `s3://` for `store_s3.S3Store`)."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import REWRITE, BundleNotFound, StoreDamaged, StoreError, StoreNotWritable, StoreWriteFailed
from .files import TMP_PREFIX, atomic_write, open_regular, read_regular
from .store_base import Edit, PutResult, Store, Unchanged, purge_plan
from .store_index import StoreIndex, VersionRecord, next_generation, refuse_too_new

__all__ = ["LocalStore", "PutResult", "Store", "atomic_write", "open_store"]

log = logging.getLogger("clipbank.store")
BLOB_NAME = re.compile(r"[0-9a-f]{64}")  # a blob's name: the sha256 of its bytes


NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)  # a read-only mount, permissions: no retry heals these


def space_hint(error: OSError) -> str:
    """Where to look when a file system is full: out of inodes, `df -h` still shows bytes free."""
    if error.errno != errno.ENOSPC:
        return ""
    return " (no free space, or no free inodes: see `df -h` and `df -i` for the store's file system)"


def write_failure(message: str, error: OSError) -> StoreWriteFailed:
    """A change that could not be written, as StoreNotWritable when no retry heals it (what it then asks of an
    operator is said), else StoreWriteFailed (a full disk, say: worth trying again later)."""
    if error.errno in NOT_WRITABLE:
        return StoreNotWritable(
            f"{message}: the store is not writable for this server, and sending it again will not help until it is"
        )
    return StoreWriteFailed(message)


class LocalStore(Store):
    """A folder `blobs/<sha256>.safetensors` + `index.json`. Several processes may share it."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        self.blobs = self.root / "blobs"
        self.index_path = self.root / "index.json"
        try:
            self.blobs.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            file = _not_a_folder(self.root)
            where = f"store {file}" if file == self.root else f"store {self.location}: {file}"
            raise StoreError(f"{where} is a file, not a folder") from None
        except OSError as e:  # a read-only file system, no permission, no free inodes: said, not a traceback
            made = "could not be used" if self.root.is_dir() else "could not be made"  # another user's, say
            raise StoreError(
                f"store {self.location}: its folder {made} ({type(e).__name__}: {e.strerror or e})"
            ) from None
        self._lock = FileLock(str(self.root / ".lock"), timeout=60)
        self._cached: tuple[tuple, StoreIndex] | None = None
        self._said_no_index = False

    # ----------------------------------------------------------------------------------------- reading

    def index(self) -> StoreIndex:
        """The current index (immutable; `_change` publishes a new one).

        Parsed again only when the file changed (its inode, size, mtime or generation): with a hundred tasks it
        is megabytes of JSON, and servers poll its generation every few seconds.
        """
        try:
            with open_regular(self.index_path) as f:
                st = os.fstat(f.fileno())
                head = f.read(64)  # holds the generation (keys are sorted), which every change increments
        except FileNotFoundError:
            return self._no_index()
        except OSError as e:
            raise self._unreadable("index.json", e) from None
        key = (st.st_ino, st.st_size, st.st_mtime_ns, head)
        cached = self._cached
        if cached is not None and cached[0] == key:
            return cached[1]
        index = self._read_index()
        self._cached = (key, index)
        return index

    def _read_index(self) -> StoreIndex:
        floor = self._seen_generation  # before the read: a write seen meanwhile does not make this one old
        try:
            data = read_regular(self.index_path)
        except FileNotFoundError:
            return self._no_index()
        except OSError as e:
            raise self._unreadable("index.json", e) from None
        return self._seen(parse_index(data, self.location), floor)

    def _no_index(self) -> StoreIndex:
        """A store with no index is empty, unless it holds blobs: the index was lost (a writer writes the index
        before its first blob), and an empty index would restart the generations and let a purge delete them."""
        if any(self.blobs.glob("*.safetensors")):
            if not self._said_no_index:  # once, not at every poll of a server while it lasts
                log.error("store %s has bundles in blobs/ but no index.json", self.root)
            self._said_no_index = True
            raise StoreDamaged(
                "the store's index.json is missing but its blobs/ folder holds bundles: restore index.json from a "
                "backup (or move blobs/ away to start an empty store); see the log"
            )
        self._index_gone()
        return StoreIndex()

    def _unreadable(self, what: str, e: OSError) -> StoreError:
        log.error("store %s: reading %s failed: %s", self.root, what, e)
        return StoreError(f"the store's {what} could not be read ({type(e).__name__}: {e.strerror or e}); see the log")

    def _read_blob(self, bundle_id: str) -> bytes:
        path = self.blobs / f"{bundle_id}.safetensors"
        try:
            return read_regular(path)
        except FileNotFoundError:
            raise BundleNotFound(f"bundle {bundle_id[:12]} is missing from the store" + REWRITE) from None
        except OSError as e:
            raise self._unreadable(f"bundle {bundle_id[:12]}", e) from None

    @contextmanager
    def _writing(self, what: str):
        """OSErrors of a change (disk full, read-only, permissions) as StoreWriteFailed naming the cause."""
        try:
            yield
        except OSError as e:
            log.error("store %s: %s failed: %s", self.root, what, e)
            named = e.filename2 or e.filename  # a rename's target: what is in the way
            path = f" {_within(self.root, named)}" if named else ""  # "Is a directory", but which?
            said = f"the store could not be written ({what}: {type(e).__name__}: {e.strerror or e}{path})"
            said += space_hint(e)
            raise write_failure(f"{said}; nothing was changed", e) from None

    # ----------------------------------------------------------------------------------------- changing

    @contextmanager
    def locked(self):
        """The store's process-safe lock (re-entrant in one process): hold it to check and change atomically. A
        lock file that cannot be made (a read-only store, no free inodes) is StoreWriteFailed: no change can be."""
        try:
            self._lock.acquire()
        except Timeout:
            log.error("store %s stayed locked for %ss", self.root, self._lock.timeout)
            raise StoreError(f"the store stayed locked by another process for {self._lock.timeout}s") from None
        except OSError as e:
            log.error("store %s: its lock could not be taken: %s", self.root, e)
            where = f": {_within(self.root, e.filename)}" if e.filename else ""  # a folder named .lock, say
            said = f"the store could not be locked for a change ({type(e).__name__}: {e.strerror or e}{where})"
            said += space_hint(e)
            raise write_failure(f"{said}; nothing was changed", e) from None
        try:
            yield
        finally:
            self._lock.release()

    def _change(self, edit: Edit, blob: tuple[str, bytes] | None = None) -> StoreIndex:
        """Lock, read the index, publish `edit(index)` with generation + 1, and return what was published. The
        blob is written under the lock, once the edit has accepted the index, so a purge cannot sweep it away."""
        with self._writing("a change"), self.locked():
            for stale in stale_temp_files(self.root):  # left by a killed writer; we hold the lock
                stale.unlink(missing_ok=True)
            current = self._read_index()
            index = next_generation(edit(current), self._known_id)
            if not self.index_path.exists():  # the index before any blob: blobs without one mean it was lost
                atomic_write(self.index_path, encode_index(current))
            wrote = None
            if blob is not None and not _holds(path := self.blobs / f"{blob[0]}.safetensors", blob[1]):
                atomic_write(path, blob[1])  # new, or a damaged copy no version names (a leftover): replaced
                wrote = path
            try:  # compact: the C encoder (with an indent, json runs in Python: slow for a big index)
                atomic_write(self.index_path, encode_index(index))
            except OSError:
                if wrote is not None and not self._names(blob[0]):  # a failed change leaves the disk as it was
                    wrote.unlink(missing_ok=True)
                raise
            return self._seen(index, None)

    def _write_blob(self, bundle_id: str, data: bytes, replace: bool = False) -> None:
        path = self.blobs / f"{bundle_id}.safetensors"
        if replace or not path.exists():
            with self._writing("writing a blob"):
                atomic_write(path, data)

    def _names(self, bundle_id: str) -> bool:
        """Whether the index on disk names `bundle_id` (True when it cannot be read: then nothing is deleted)."""
        try:
            return self._read_index().owner(bundle_id) is not None
        except (OSError, StoreError):
            return True

    def _purge(self, task: str, deactivate: bool = False) -> int:
        doomed: list[VersionRecord] = []

        def edit(index: StoreIndex) -> StoreIndex:
            kept, gone = purge_plan(index, task, deactivate)
            doomed[:] = gone
            if kept == index:  # every version kept (other tasks use their experts): no new generation to build
                raise Unchanged
            return kept

        with self._writing("a purge"), self.locked():  # held until the blobs are gone: no put reuses one meanwhile
            try:
                index = self._change(edit)
            except Unchanged:
                index = self._read_index()
            deleted, failed = 0, None  # the index no longer names them: a blob left behind is a leftover, not a fault
            for v in doomed:
                try:
                    (self.blobs / f"{v.bundle_id}.safetensors").unlink()
                    deleted += 1
                except FileNotFoundError:  # gone already (a damaged store's): not counted as deleted now
                    pass
                except OSError as e:  # not counted: it is still there (an outside check: a read-only blobs/)
                    failed = e
            try:
                for path in _unnamed(self.blobs, index):
                    path.unlink(missing_ok=True)
            except OSError as e:
                failed = e
            if failed is not None:
                log.warning("store %s: purged %s, but deleting its blobs failed: %s", self.root, task, failed)
        return deleted

    def sweep(self) -> dict[str, int]:
        """Delete what killed writers left, under the lock: temp files, and whole blobs no version names (what any
        purge deletes too, without purging a task). A store whose index is lost is damaged: nothing is deleted."""
        with self._writing("a clean-up"), self.locked():
            temp = stale_temp_files(self.root)
            index = self._read_index()
            refuse_too_new(index)  # a newer release's index may name blobs this one cannot see
            strays = _unnamed(self.blobs, index)
            for path in temp + strays:
                path.unlink(missing_ok=True)
        return {"temp_files": len(temp), "unreferenced_blobs": len(strays)}


def _within(root: Path, filename: object) -> str:
    """A file of the store as the store names it (`blobs/.tmp-x`): clients are not told the server's paths."""
    try:
        return str(Path(str(filename)).relative_to(root))
    except ValueError:
        return Path(str(filename)).name


def _not_a_folder(root: Path) -> Path:
    """The first of `root`, its parents or its `blobs/` that exists and is not a folder."""
    for path in (*reversed(root.parents), root, root / "blobs"):
        if path.exists() and not path.is_dir():
            return path
    return root


def encode_index(index: StoreIndex) -> bytes:
    """The index file's bytes: compact, keys sorted (the generation is then within its first 64 bytes)."""
    return json.dumps(index.to_json(), sort_keys=True, separators=(",", ":")).encode()


def parse_index(data: bytes, where: str) -> StoreIndex:
    """An index file's bytes, typed; a corrupt one is a StoreError (the details go to the log only)."""
    try:
        index = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSON errors and bad UTF-8
        _say_once(where, f"store index of {where} is corrupt: {e}")
        raise StoreError(f"the store index is corrupt ({str(e)[:120]}); see the log") from None
    try:
        typed = StoreIndex.from_json(index)
    except StoreError as e:
        _say_once(where, f"store index of {where}: {e}")
        raise
    _said.pop(where, None)  # read again: a later fault is said again
    return typed


_said: dict[str, str] = {}  # per store, the index fault last logged


def _say_once(where: str, message: str) -> None:
    """A fault of the index, logged once until it changes: servers read it on every poll and change (16 lines in
    25 s in an outside check), and the server says it on its own when it starts and stops failing."""
    if _said.get(where) != message:
        _said[where] = message
        log.error("%s", message)


def open_store(location: str | os.PathLike) -> Store:
    """The store at `location` (`--store`, `CLIPBANK_STORE`): `s3://bucket/prefix` for an S3-compatible object
    store (the `[scale]` extra; `store_s3.S3Store.from_url` reads its settings), else a local folder, created if
    missing. Any other scheme is refused by name."""
    text = str(location)
    if text.startswith("s3://"):
        from .store_s3 import S3Store

        return S3Store.from_url(text)
    if re.match(r"^[a-z][a-z0-9+.-]*://", text, re.IGNORECASE):  # S3:// was made a local folder "S3:"
        scheme = text.split("://")[0]
        hint = f" (write the scheme in lower case: s3://{text[5:]})" if scheme.lower() == "s3" else ""
        raise StoreError(f"store {text!r}: a store is a local folder or s3://bucket/prefix, not {scheme}://{hint}")
    return LocalStore(os.path.expanduser(text))  # `CLIPBANK_STORE=~/x`: no shell expands a variable's `~`


def _unnamed(blobs: Path, index: StoreIndex) -> list[Path]:
    """The whole blobs no version names (a killed writer's, a purge's that failed); only files a store names so,
    not an operator's copy."""
    named = {v.bundle_id for _, v in index.records()}  # a folder of such a name is an operator's: not deleted (it
    # failed every clean-up, after its temp files were gone, saying "nothing was changed")
    found = blobs.glob("*.safetensors")
    return [p for p in found if p.stem not in named and BLOB_NAME.fullmatch(p.stem) and not p.is_dir()]


def stale_temp_files(root: Path) -> list[Path]:
    """The temp files a killed writer left in a store folder. A folder of such a name is not one (an operator's,
    say): left alone, where deleting it failed every change (an outside check)."""
    return [p for folder in (root, root / "blobs") for p in folder.glob(TMP_PREFIX + "*") if not p.is_dir()]


def _holds(path: Path, data: bytes) -> bool:
    """Whether the file at `path` is `data`: a blob already there is checked, not trusted (an outside check: a
    damaged leftover of a purged version was kept under a new upload of the same bundle, answered 201)."""
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except FileNotFoundError:
        return False

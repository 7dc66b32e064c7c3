"""The local bundle store: immutable blobs plus one index file, changed atomically under a process-safe lock."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .bundle import Bundle, read_bundle, utc_now
from .digest import bytes_digest
from .errors import BundleNotFound, MissingExpert, ShadowConflict, StoreError, VersionConflict
from .manifest import finite_metrics, shown, validate_task_name
from .store_index import StoreIndex, TaskRecord, VersionRecord

log = logging.getLogger("clipbank.store")
TMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write temp, fsync, rename, fsync the folder: readers see the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class PutResult:
    task: str
    version: int
    bundle_id: str
    experts_added: int
    generation: int
    gate: dict[str, Any] | None = None  # the interference gate's report, when a server checked the upload


class LocalStore:
    """A folder `blobs/<sha256>.safetensors` + `index.json`. Several processes may share it."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.index_path = self.root / "index.json"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.root / ".lock"), timeout=60)
        self._cached: tuple[tuple, StoreIndex] | None = None

    # ----------------------------------------------------------------------------------------- reading

    def index(self) -> StoreIndex:
        """The current index (immutable; `_change` publishes a new one).

        Parsed again only when the file changed (its inode, size, mtime or generation): with a hundred tasks it
        is megabytes of JSON, and servers poll its generation every few seconds.
        """
        try:
            with open(self.index_path, "rb") as f:
                st = os.fstat(f.fileno())
                head = f.read(64)  # holds the generation (keys are sorted), which every change increments
        except FileNotFoundError:
            return StoreIndex()
        key = (st.st_ino, st.st_size, st.st_mtime_ns, head)
        cached = self._cached
        if cached is not None and cached[0] == key:
            return cached[1]
        index = self._read_index()
        self._cached = (key, index)
        return index

    def _read_index(self) -> StoreIndex:
        try:
            index = json.loads(self.index_path.read_text())
        except FileNotFoundError:
            return StoreIndex()
        except (ValueError, RecursionError) as e:  # JSON errors and bad UTF-8; the path goes to the log only
            log.error("store index %s is corrupt: %s", self.index_path, e)
            raise StoreError(f"the store index is corrupt ({str(e)[:120]}); see the server log") from None
        try:
            return StoreIndex.from_json(index)
        except StoreError as e:
            log.error("store index %s: %s", self.index_path, e)
            raise

    def generation(self) -> int:
        return self.index().generation

    def task(self, name: str) -> TaskRecord:
        return self.index().task(name)

    def version(self, task: str, version: int) -> VersionRecord:
        """The index record of one stored version."""
        return self.index().version(task, version)

    def active(self) -> dict[str, str]:
        """{task: active bundle id} for every task that has one."""
        return self.index().active()

    def read(self, bundle_id: str) -> bytes:
        path = self.blobs / f"{bundle_id}.safetensors"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BundleNotFound(f"bundle {bundle_id[:12]} is missing from the store") from None
        if bytes_digest(data) != bundle_id:
            log.error("blob %s does not hash to its name", path)
            raise StoreError(f"blob {bundle_id[:12]} does not hash to its name: the store is damaged")
        return data

    def load(self, bundle_id: str) -> Bundle:
        return read_bundle(self.read(bundle_id))

    def expert_sources(self) -> dict[str, str]:
        """{expert id: id of the bundle that added it}, over every stored version."""
        return self.index().expert_sources()

    # ----------------------------------------------------------------------------------------- changing

    @contextmanager
    def locked(self):
        """The store's process-safe lock (re-entrant in one process): hold it to check and change atomically."""
        try:
            with self._lock:
                yield
        except Timeout:
            log.error("store %s stayed locked for %ss", self.root, self._lock.timeout)
            raise StoreError(f"the store stayed locked by another process for {self._lock.timeout}s") from None

    def _change(self, edit: Callable[[StoreIndex], StoreIndex]) -> StoreIndex:
        """Lock, read the index, publish `edit(index)` with generation + 1, and return what was published."""
        with self.locked():
            for folder in (self.root, self.blobs):  # temp files left by a killed writer; we hold the lock
                for stale in folder.glob(TMP_PREFIX + "*"):
                    stale.unlink(missing_ok=True)
            index = edit(self._read_index())
            index = replace(index, generation=index.generation + 1)
            # compact: the C encoder (with an indent, json runs in Python: slow for a big index)
            data = json.dumps(index.to_json(), sort_keys=True, separators=(",", ":")).encode()
            atomic_write(self.index_path, data)
            return index

    def put(
        self,
        data: bytes,
        activate: bool = True,
        metrics: dict[str, Any] | None = None,
        bundle: Bundle | None = None,
        shadow: bool = False,
    ) -> PutResult:
        """Validate and store a bundle; by default make it the task's active version (`shadow`: put it in shadow).

        `bundle` is `read_bundle(data)` when the caller has it already (checked against the bytes' digest).
        """
        if bundle is None or bundle.id != bytes_digest(data):
            bundle = read_bundle(data)
        return self.put_validated(bundle, data, activate, metrics, shadow=shadow)

    def put_validated(
        self,
        bundle: Bundle,
        data: bytes,
        activate: bool = True,
        metrics: dict[str, Any] | None = None,
        gate: dict[str, Any] | None = None,
        shadow: bool = False,
    ) -> PutResult:
        """Store a bundle the caller has just read: `bundle` must be `read_bundle(data)`, and is trusted (neither
        parsed nor hashed again). Callers holding only bytes, or a bundle read elsewhere, use `put`.

        `shadow`: the new version scores live traffic without answering it (replacing any version in shadow)."""
        activate = activate and not shadow  # a version in shadow is not routed to
        if bundle.file_bytes != len(data):  # a cheap guard against handing in another bundle's bytes
            raise ValueError(f"bundle {bundle.id[:12]} was read from {bundle.file_bytes} bytes, not these {len(data)}")
        record = VersionRecord(
            version=bundle.version,
            bundle_id=bundle.id,
            created_at=bundle.manifest.created_at,
            stored_at=utc_now(),
            bytes=len(data),
            experts_new=bundle.manifest.experts_new,
            classes=bundle.manifest.classes,
            uses=bundle.uses,
            metrics=metrics or _metrics_of(bundle),
            gate=gate,
        )

        def add(index: StoreIndex) -> StoreIndex:
            newest = index.tasks[bundle.task].newest if bundle.task in index.tasks else 0
            if bundle.version <= newest:
                raise VersionConflict(
                    f"task {bundle.task!r} already has version {newest}; a new bundle needs version > {newest}, "
                    f"got {bundle.version}"
                )
            stored = {eid for _, v in index.records() for eid in v.experts_new}
            missing = [e[:12] for e in bundle.uses if e not in stored]
            if missing:  # a task trained on experts purged since: it could never be served
                raise MissingExpert(
                    f"bundle uses {len(missing)} expert(s) no stored version adds (purged?): {', '.join(missing[:5])}"
                )
            path = self.blobs / f"{bundle.id}.safetensors"
            if not path.exists():
                atomic_write(path, data)
            return index.with_task(
                bundle.task,
                lambda t: TaskRecord(
                    (*t.versions, record), bundle.id if activate else t.active, bundle.id if shadow else t.shadow
                ),
            )

        index = self._change(add)
        return PutResult(bundle.task, bundle.version, bundle.id, len(bundle.experts), index.generation, gate)

    def activate(self, task: str, version: int) -> str:
        """Make `version` the active one (rollback, roll forward, or promotion of the version in shadow, which then
        leaves the shadow); returns its bundle id."""
        chosen: list[str] = []

        def edit(index: StoreIndex) -> StoreIndex:
            chosen.append(index.version(task, version).bundle_id)
            return index.with_task(task, lambda t: replace(t, active=chosen[0], shadow=_unless(t.shadow, chosen[0])))

        self._change(edit)
        return chosen[0]

    def set_shadow(self, task: str, version: int | None) -> str | None:
        """Put a stored, inactive version in shadow (None: stop shadowing); returns its bundle id."""
        chosen: list[str | None] = []

        def edit(index: StoreIndex) -> StoreIndex:
            record = index.task(task)  # TaskNotFound
            chosen.append(None if version is None else index.version(task, version).bundle_id)
            if chosen[0] is not None and chosen[0] == record.active:
                raise ShadowConflict(
                    f"task {shown(task)} version {version} is active: only another version can shadow it"
                )
            return index.with_task(task, lambda t: replace(t, shadow=chosen[0]))

        self._change(edit)
        return chosen[0]

    def deactivate(self, task: str) -> None:
        """Stop routing to a task. Its blobs stay, so it can be re-activated."""

        def edit(index: StoreIndex) -> StoreIndex:
            index.task(task)  # TaskNotFound
            return index.with_task(task, lambda t: replace(t, active=None))

        self._change(edit)

    def purge(self, task: str) -> int:
        """Forget an inactive task and delete the blobs nothing else needs; returns that task's blobs deleted.

        Whole blobs no version names (a writer killed between a blob and the index) are deleted too.
        """
        validate_task_name(task)
        doomed: list[VersionRecord] = []

        def edit(index: StoreIndex) -> StoreIndex:
            record = index.task(task)
            if record.active:
                raise StoreError(f"task {shown(task)} is active; deactivate it before purging")
            others = index.with_task(task, lambda t: None)
            needed = {u for _, v in others.records() for u in v.uses}
            doomed.extend(v for v in record.versions if not needed.intersection(v.experts_new))
            kept = tuple(v for v in record.versions if v not in doomed)
            # experts still used by other tasks: keep those versions, inactive (and out of shadow)
            return others.with_task(task, lambda t: TaskRecord(kept) if kept else None)

        with self.locked():  # held until the blobs are gone, so a concurrent put cannot reuse one being deleted
            index = self._change(edit)
            for v in doomed:  # only once the index no longer names them
                (self.blobs / f"{v.bundle_id}.safetensors").unlink(missing_ok=True)
            named = {v.bundle_id for _, v in index.records()}
            for path in self.blobs.glob("*.safetensors"):
                if path.stem not in named and not path.name.startswith(TMP_PREFIX):
                    path.unlink(missing_ok=True)
        return len(doomed)


def _unless(shadow: str | None, activated: str) -> str | None:
    return None if shadow == activated else shadow


def open_store(location: str | os.PathLike) -> LocalStore:
    """The store at `location` (`--store`, `CLIPBANK_STORE`): a local folder, created if missing. Object stores
    (`s3://bucket/prefix`) are a planned second backend; until then such a location is refused by name."""
    text = str(location)
    if re.match(r"^[a-z][a-z0-9+.-]*://", text):
        raise StoreError(f"store {text!r}: only local folders are supported so far, not {text.split('://')[0]}://")
    return LocalStore(location)


def _metrics_of(bundle: Bundle) -> dict[str, Any]:
    return finite_metrics(bundle.manifest.training, ("val_accuracy", "zero_shot_val_accuracy"))


def check_store(root: str | os.PathLike) -> list[str]:
    """Every problem of a store folder, empty when consistent.

    Temp files and whole blobs the index does not name are not problems (a killed writer may leave them; the
    next writer removes the temp files): `store_leftovers` counts them.
    """
    root = Path(root)
    try:
        index = json.loads((root / "index.json").read_bytes())
    except FileNotFoundError:
        return []
    except (ValueError, RecursionError) as e:
        return [f"index.json does not parse: {str(e)[:120]}"]
    if not isinstance(index, dict) or type(index.get("generation")) is not int:
        return ["index.json has no integer 'generation'"]
    if not isinstance(index.get("tasks"), dict):
        return ["index.json has no 'tasks' mapping"]
    problems, whole = [], set()
    for path in (root / "blobs").glob("*.safetensors"):
        if bytes_digest(path.read_bytes()) == path.stem:
            whole.add(path.stem)
        elif not path.name.startswith(TMP_PREFIX):
            problems.append(f"blob {path.name[:12]} does not hash to its name")
    try:
        return problems + _index_problems(index["tasks"], whole)
    except (AttributeError, KeyError, TypeError) as e:
        return [*problems, f"index.json has a malformed task entry ({type(e).__name__}: {str(e)[:120]})"]


def _index_problems(tasks: dict[str, Any], whole: set[str]) -> list[str]:
    """Dangling ids in the index: blobs not in `whole`, active ids no version has, experts no version adds."""
    problems = []
    added = {eid for e in tasks.values() for v in e["versions"] for eid in v.get("experts_new", [])}
    for task, entry in tasks.items():
        numbers = [v["version"] for v in entry["versions"]]
        if len(set(numbers)) != len(numbers):
            problems.append(f"task {shown(task)}: a version number is stored twice: {numbers}")
        for key in ("active", "shadow"):
            if entry.get(key) and entry[key] not in {v["bundle_id"] for v in entry["versions"]}:
                problems.append(f"task {shown(task)}: the {key} bundle {entry[key][:12]} is none of its versions")
        for v in entry["versions"]:
            name = f"task {shown(task)} version {v['version']}"
            if v["bundle_id"] not in whole:
                problems.append(f"{name}: its blob {v['bundle_id'][:12]} is missing or damaged")
            missing = [eid[:12] for eid in v.get("uses", []) if eid not in added]
            if missing:
                problems.append(f"{name}: uses experts no stored version adds: {', '.join(missing[:5])}")
    return problems


def store_leftovers(root: str | os.PathLike) -> dict[str, int]:
    """What a killed writer may leave that is not a problem: temp files, and whole blobs the index does not name."""
    root = Path(root)
    index_path = root / "index.json"
    tasks = json.loads(index_path.read_bytes())["tasks"] if index_path.exists() else {}
    named = {v["bundle_id"] for e in tasks.values() for v in e["versions"]}
    temp = [p for folder in (root, root / "blobs") for p in folder.glob(TMP_PREFIX + "*")]
    blobs = [p for p in (root / "blobs").glob("*.safetensors") if not p.name.startswith(TMP_PREFIX)]
    return {"temp_files": len(temp), "unreferenced_blobs": sum(p.stem not in named for p in blobs)}

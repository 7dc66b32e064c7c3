"""What every store backend shares: the operations (put, activate, shadow, deactivate, purge) and their checks,
written once over a few primitives each backend provides (docs/store.md).

A backend gives: `index()`; `_change(edit, blob)`, which publishes `edit(index)` with the generation one higher
atomically (the local folder under a file lock, S3 by compare-and-swap) after making sure the blob `blob` names
is stored; `_read_blob`; `_write_blob`; `_purge(task, deactivate)`; `locked()`; and `location`, a printable name without
secrets.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import Any

from .bundle import Bundle, read_bundle, utc_now
from .digest import bytes_digest
from .errors import (
    REWRITE,
    BundleInvalid,
    BundleNotFound,
    MissingExpert,
    ShadowConflict,
    StoreDamaged,
    StoreError,
    StoreMoved,
)
from .labels import unanswerable_class
from .manifest import index_metrics, shown, validate_task_name
from .store_index import StoreIndex, TaskRecord, VersionRecord, refuse_stored_version, refuse_too_new

Edit = Callable[[StoreIndex], StoreIndex]


class BlobBeingDeleted(StoreError):
    """A put met its own blob in the middle of a purge's deletion (S3 only): retried once the purge is done."""

    code = "store_busy"


class Unchanged(Exception):
    """Raised by an edit that would change nothing: `_change` writes nothing, and the generation stays, so no
    server builds its bank again for a repeated activate or deactivate."""


@dataclass(frozen=True)
class PutResult:
    task: str
    version: int
    bundle_id: str
    experts_added: int
    generation: int
    gate: dict[str, Any] | None = None  # the interference gate's report, when a server checked the upload
    restored: bool = False  # the bytes of a stored version whose missing or damaged blob they wrote back


class Store:
    """The operations of a bundle store. Subclasses: `LocalStore` (a folder) and `S3Store` (an object store)."""

    location: str
    _based_on = threading.local()  # per thread: (store, generation) that `based_on` set
    _seen_generation = 0  # the highest generation this object has read: a store never goes back from it
    _seen_id = _known_id = None  # of the index last read (None after an older release's write); the last one read

    def without_location(self, text: str) -> str:
        """`text` with this store's location shown by its last part (`/srv/x/store` as `store`), for messages that
        reach the open `/healthz`, which never shows the server's paths."""
        name = self.location.rstrip("/").rsplit("/", 1)[-1]
        return text.replace(self.location, name) if name else text

    def _seen(self, index: StoreIndex, floor: int | None) -> StoreIndex:
        """`index`, read when this object had seen generation `floor` (None: it wrote `index`; a read begun before a
        newer one was seen is not held to it), or StoreDamaged if it went back from `floor` or is another store's
        (wiped and made again, or restored, under a running server, which then served a bank no longer stored)."""
        other = self._seen_id is not None and index.store_id not in (None, self._seen_id)
        if other and floor is not None and (index.store_id_since or 0) > floor:  # made after all we read: an older
            other = False  # release dropped the id we knew in a write we did not see (a replaced store's is older)
        if floor is not None and (index.generation < floor or other):
            why = "is another store's" if other else f"went back from generation {floor}"
            raise StoreDamaged(
                f"the store was replaced under this process (its index.json {why}; was it deleted "
                "and made again, or restored from a backup?): restart the server to serve the store as it now is"
            )
        self._seen_generation = max(self._seen_generation, index.generation)
        self._seen_id, self._known_id = index.store_id, index.store_id or self._known_id  # the writer keeps this one
        return index

    def _index_gone(self) -> None:
        """StoreDamaged when the index is missing after this object read one: the store (or its folder) was
        deleted or replaced under a running server. Read as empty, it dropped every task, restarted the
        generations, and a later change wrote a generation-0 index that let a purge delete restored blobs."""
        if self._seen_generation > 0:
            raise StoreDamaged(
                f"the store's index.json is gone (it was at generation {self._seen_generation}; was the store deleted "
                "or moved?): restore the store from a backup, or restart the server to start a new, empty store "
                "there; until then the last bank serves and nothing can be changed"
            )

    @contextmanager
    def based_on(self, generation: int) -> Iterator[None]:
        """The next put, activation or shadow change made in this thread publishes only onto the index at
        `generation`, the one its caller checked (the interference gate); else StoreMoved and nothing is written.
        A folder's lock already makes that so; on S3, another server may have changed the index since."""
        Store._based_on.value = (self, generation)
        try:
            yield
        finally:
            Store._based_on.value = None

    def _checked(self, edit: Edit) -> Edit:
        """`edit`, refused with StoreMoved on an index other than the one `based_on` names (then cleared)."""
        based = getattr(Store._based_on, "value", None)
        if based is None or based[0] is not self:
            return edit
        Store._based_on.value = None  # one change: a later one in the same block is not held to it
        expected = based[1]

        def checked(index: StoreIndex) -> StoreIndex:
            if index.generation != expected:
                raise StoreMoved(
                    f"the store moved from generation {expected} to {index.generation} while this change was checked"
                )
            return edit(index)

        return checked

    # ----------------------------------------------------------------------------------------- primitives

    def index(self) -> StoreIndex:
        raise NotImplementedError

    def _read_blob(self, bundle_id: str) -> bytes:
        """The blob's bytes as stored (BundleNotFound when absent); `read` verifies them."""
        raise NotImplementedError

    def _write_blob(self, bundle_id: str, data: bytes, replace: bool = False) -> None:
        """Store a blob under its id; `replace`: also over a copy already there (a damaged one: `restore`)."""
        raise NotImplementedError

    def _blob_intact(self, bundle_id: str) -> bool:
        """Whether the store holds the blob whole (past any local cache)."""
        try:
            return bytes_digest(self._read_blob(bundle_id)) == bundle_id
        except BundleNotFound:
            return False

    def _change(self, edit: Edit, blob: tuple[str, bytes] | None = None) -> StoreIndex:
        raise NotImplementedError

    def _purge(self, task: str, deactivate: bool = False) -> int:
        raise NotImplementedError

    def locked(self) -> AbstractContextManager:
        """A lock other writers of this store respect while it is held, where the backend has one."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- reading

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

    def expert_sources(self) -> dict[str, str]:
        """{expert id: id of the bundle that added it}, over every stored version."""
        return self.index().expert_sources()

    def read(self, bundle_id: str) -> bytes:
        """A blob's bytes, verified against its name (content addressing) on every read."""
        data = self._read_blob(bundle_id)
        if bytes_digest(data) != bundle_id:
            raise StoreDamaged(f"blob {bundle_id[:12]} does not hash to its name: the store is damaged" + REWRITE)
        return data

    def load(self, bundle_id: str) -> Bundle:
        return read_bundle(self.read(bundle_id))

    # ----------------------------------------------------------------------------------------- changing

    def put(
        self,
        data: bytes,
        activate: bool = True,
        metrics: dict[str, Any] | None = None,
        bundle: Bundle | None = None,
        shadow: bool = False,
        gate: dict[str, Any] | None = None,
    ) -> PutResult:
        """Validate and store a bundle; by default make it the task's active version (`shadow`: put it in shadow).

        Ungated (servers on this store serve an active version at their next poll): check `train_task`'s
        `report["routing"]["gate"]` (`passed`, `offences`) first, or push through a server (`ClipbankClient.push`).
        `bundle` is `read_bundle(data)` when the caller has it already (checked against the bytes' digest); `gate`
        the interference gate's report of it, kept beside the version.
        """
        if bundle is None or bundle.id != bytes_digest(data):
            bundle = read_bundle(data)
        return self.put_validated(bundle, data, activate, metrics, gate, shadow)

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
        if (why := unanswerable_class(bundle.manifest.classes)) is not None:  # new bundles only: stored ones serve
            raise BundleInvalid(why)
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
            metrics=metrics or index_metrics(bundle.manifest.training),
            gate=gate,
        )

        def add(index: StoreIndex) -> StoreIndex:
            added = replace(record, uses=_check_addable(index, bundle))
            return index.with_task(
                bundle.task,
                lambda t: TaskRecord(
                    (*t.versions, added), bundle.id if activate else t.active, bundle.id if shadow else t.shadow
                ),
            )

        index = self._change(self._checked(add), blob=(bundle.id, data))
        return PutResult(bundle.task, bundle.version, bundle.id, len(bundle.experts), index.generation, gate)

    def restore(self, bundle: Bundle, data: bytes) -> int | None:
        """Write a stored version's blob back from the bundle's own bytes when it is missing or damaged. Its id is
        their digest, so they are that version, byte for byte. Publishes generation + 1: every server then builds
        its bank again, and the tasks the blob disabled serve again. Returns that generation; None, with nothing
        changed, when the stored blob is whole. The version's state (active, shadow, inactive) does not change."""
        if bundle.id != bytes_digest(data):
            raise ValueError(f"bundle {bundle.id[:12]} was not read from these bytes")

        def edit(index: StoreIndex) -> StoreIndex:
            if index.owner(bundle.id) is None:
                raise BundleNotFound(f"bundle {bundle.id[:12]} is no stored version: there is nothing to restore")
            if bundle.id in index.deleting:
                raise BlobBeingDeleted(f"blob {bundle.id[:12]} is being deleted by a purge; try again")
            return index

        with self.locked():
            edit(self.index())
            if self._blob_intact(bundle.id):
                return None
            self._write_blob(bundle.id, data, replace=True)
            return self._change(edit).generation

    def activate(self, task: str, version: int, gate: dict[str, Any] | None = None) -> str:
        """Make `version` the active one (rollback, roll forward, or promotion of the version in shadow, which then
        leaves the shadow); returns its bundle id. `gate`: the interference gate's report on this activation, kept
        beside the version in place of the one before (its upload's)."""
        chosen: list[str] = []

        def edit(index: StoreIndex) -> StoreIndex:
            chosen[:] = [index.version(task, version).bundle_id]
            if index.task(task).active == chosen[0]:
                raise Unchanged
            gated = _stamped(gate, "activation")
            return index.with_task(
                task, lambda t: replace(t, active=chosen[0], shadow=_unless(t.shadow, chosen[0])).with_gate(gated)
            )

        self._unless_unchanged(edit)
        return chosen[0]

    def _unless_unchanged(self, edit: Edit, checked: bool = True) -> None:
        """`_change(edit)`, held to `based_on` when `checked`; nothing when the edit raises Unchanged."""
        try:
            self._change(self._checked(edit) if checked else edit)
        except Unchanged:
            pass

    def set_shadow(self, task: str, version: int | None, gate: dict[str, Any] | None = None) -> str | None:
        """Put a stored, inactive version in shadow (None: stop shadowing); returns its bundle id. `gate`: the
        interference gate's report on it, kept beside the version."""
        chosen: list[str | None] = []

        def edit(index: StoreIndex) -> StoreIndex:
            record = index.task(task)  # TaskNotFound
            chosen[:] = [None if version is None else index.version(task, version).bundle_id]
            if chosen[0] is not None and chosen[0] == record.active:
                raise ShadowConflict(
                    f"task {shown(task)} version {version} is active: only another version can shadow it"
                )
            if record.shadow == chosen[0]:  # in shadow already (or no shadow to stop): no new generation
                raise Unchanged
            return index.with_task(task, lambda t: replace(t, shadow=chosen[0]).with_gate(_stamped(gate, "shadow")))

        self._unless_unchanged(edit)
        return chosen[0]

    def deactivate(self, task: str) -> None:
        """Stop routing to a task. Its blobs stay, so it can be re-activated."""

        def edit(index: StoreIndex) -> StoreIndex:
            if index.task(task).active is None:  # TaskNotFound, or inactive already
                raise Unchanged
            return index.with_task(task, lambda t: replace(t, active=None))

        self._unless_unchanged(edit, checked=False)

    def purge(self, task: str, deactivate: bool = False) -> int:
        """Forget an inactive task (`deactivate`: an active one too, in the same index write) and delete the blobs
        nothing else needs; returns that task's blobs deleted.

        A blob is deleted only once an index without it is published. Whole blobs no version names (a writer
        killed between a blob and the index) are deleted too. The task leaves the index in one write (a
        deactivation and then a purge left it deactivated, unpurged, when killed between them): killed at any
        instant, it is as it was or purged (inactive, with no shadow, where other tasks keep some of its versions);
        a kill after that write leaves at most blobs no version names (S3: `deleting` entries), which the next
        purge removes.
        """
        validate_task_name(task)
        return self._purge(task, deactivate)


def _check_addable(index: StoreIndex, bundle: Bundle) -> tuple[str, ...]:
    """A put's checks against the index it would change: a newer version, every expert it uses still stored,
    and (S3) its blob not in the middle of a purge's deletion. Returns its record's `uses`: of the experts it
    uses, one per stored bundle that added them (a purge keeps a version any of whose experts another uses).

    All of them would do too, and releases before 2026-12-03 wrote all: every task of a bank uses most older
    experts, so the index grew as tasks squared (5.46 MB of JSON at 100 tiny tasks, against 0.48 MB), parsed and
    rewritten at every change, and its transients were the biggest part of the server's memory per task beyond
    the bundles. Older releases read this `uses` the same way, so a purge by any release keeps the same blobs."""
    refuse_stored_version(index, bundle)
    stored = index.expert_sources()
    missing = [e[:12] for e in bundle.uses if e not in stored]
    if missing:  # a task trained on experts purged since: it could never be served
        raise MissingExpert(
            f"bundle uses {len(missing)} expert(s) no stored version adds (purged?): {', '.join(missing[:5])}"
        )
    if bundle.id in index.deleting:
        raise BlobBeingDeleted(f"blob {bundle.id[:12]} is being deleted by a purge; try again")
    one: dict[str, str] = {}
    for eid in sorted(bundle.uses):
        one.setdefault(stored[eid], eid)
    return tuple(sorted(one.values()))


def purge_plan(index: StoreIndex, task: str, deactivate: bool = False) -> tuple[StoreIndex, list[VersionRecord]]:
    """The index without inactive `task` (`deactivate`: or active; versions whose experts other tasks use stay,
    inactive), and the versions whose blobs may go."""
    refuse_too_new(index)  # before any Unchanged: a purge that writes nothing still deletes stray blobs
    record = index.task(task)
    if record.active and not deactivate:
        raise StoreError(f"task {shown(task)} is active; deactivate it before purging")
    others = index.with_task(task, lambda t: None)
    needed = {u for _, v in others.records() for u in v.uses}
    doomed = [v for v in record.versions if not needed.intersection(v.experts_new)]
    kept = tuple(v for v in record.versions if v not in doomed)
    return others.with_task(task, lambda t: TaskRecord(kept) if kept else None), doomed


def needed_by(index: StoreIndex, task: str) -> dict[int, list[str]]:
    """Of `task`'s stored versions, those whose experts other tasks use, with those tasks: what a purge keeps."""
    out: dict[int, list[str]] = {}
    if task not in index.tasks:
        return out
    for v in index.task(task).versions:
        users = {t for t, u in index.records() if t != task and set(u.uses).intersection(v.experts_new)}
        if users:
            out[v.version] = sorted(users)
    return out


def _unless(shadow: str | None, activated: str) -> str | None:
    return None if shadow == activated else shadow


def _stamped(gate: dict[str, Any] | None, checked_on: str) -> dict[str, Any] | None:
    return None if gate is None else {**gate, "checked_on": checked_on, "checked_at": utc_now()}

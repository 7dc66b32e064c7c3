"""The store's index, typed: which versions of which tasks are stored, and which one of each is active.

Read with `StoreIndex.from_json` and written with `to_json`; the JSON layout is the store format
(docs/store.md). Optional fields an older release did not write, or wrote with another type, read as their
defaults; a structural problem (a task entry that is not an object, a version without its number or bundle id)
is a StoreError naming it, so nothing is served or written from an index that cannot be understood.
"""

from __future__ import annotations

import json
import math
import re
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .errors import StoreError, StoreTooNew, TaskNotFound, VersionConflict, VersionNotFound
from .labels import cut
from .manifest import ID_RE, shown

if TYPE_CHECKING:
    from .bundle import Bundle

STORE_ID_RE = re.compile(r"[0-9a-f]{32}")

INDEX_FORMAT = 1
MAX_GENERATION = 2**53 - 1  # the largest integer a JSON client reads exactly


def _strings(value: Any) -> tuple[str, ...]:
    """The strings of a JSON list, interned: ids repeat across versions, one object per id in the process."""
    return tuple(sys.intern(v) for v in value if isinstance(v, str)) if isinstance(value, list) else ()


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class VersionRecord:
    """One stored version of a task: its bundle and what the listing shows without reading the bundle."""

    version: int
    bundle_id: str
    created_at: str | None = None  # when it was trained (from its manifest)
    stored_at: str | None = None
    bytes: int = 0
    experts_new: tuple[str, ...] = ()  # experts it adds to the store
    classes: tuple[str, ...] | None = None
    # older experts its routers choose among: one per stored bundle they come from, which is what a purge needs
    # (keep those bundles); listing them all (releases before 2026-12-03) grew as tasks squared
    uses: tuple[str, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)
    gate: Mapping[str, Any] | None = None  # the interference gate's latest report on it: upload, shadow or activation

    @classmethod
    def from_json(cls, obj: Any, where: str) -> VersionRecord:
        if (
            not isinstance(obj, dict)
            or type(obj.get("version")) is not int
            or not isinstance(obj.get("bundle_id"), str)
        ):
            raise StoreError(f"the store index is malformed: {where} has no integer version and bundle id")
        if not ID_RE.fullmatch(obj["bundle_id"]):
            raise StoreError(f"the store index is malformed: {where} names bundle {shown(obj['bundle_id'], 20)}")
        metrics = obj.get("metrics")
        return cls(
            version=obj["version"],
            bundle_id=obj["bundle_id"],
            created_at=_text_or_none(obj.get("created_at")),
            stored_at=_text_or_none(obj.get("stored_at")),
            bytes=obj["bytes"] if type(obj.get("bytes")) is int else 0,
            experts_new=_strings(obj.get("experts_new")),
            classes=_strings(obj["classes"]) if isinstance(obj.get("classes"), list) else None,
            uses=_strings(obj.get("uses")),
            metrics={k: float(v) for k, v in metrics.items() if _finite(v)} if isinstance(metrics, dict) else {},
            gate=obj["gate"] if isinstance(obj.get("gate"), dict) else None,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "bundle_id": self.bundle_id,
            "created_at": self.created_at,
            "stored_at": self.stored_at,
            "bytes": self.bytes,
            "experts_new": list(self.experts_new),
            "classes": list(self.classes) if self.classes is not None else None,
            "uses": list(self.uses),
            "metrics": dict(self.metrics),
            **({"gate": dict(self.gate)} if self.gate is not None else {}),
        }


@dataclass(frozen=True)
class TaskRecord:
    """A task's stored versions (oldest first), the bundle id of the active one (None: not routed to) and of the
    one in shadow (scoring live traffic without answering it; docs/safety.md), if any."""

    versions: tuple[VersionRecord, ...] = ()
    active: str | None = None
    shadow: str | None = None

    @classmethod
    def from_json(cls, obj: Any, task: str) -> TaskRecord:
        if not isinstance(obj, dict) or not isinstance(obj.get("versions"), list):
            raise StoreError(f"the store index is malformed: task {shown(task)} is not an object with versions")
        versions = tuple(
            VersionRecord.from_json(v, f"task {shown(task)} version entry {i}") for i, v in enumerate(obj["versions"])
        )
        named = {}
        for key in ("active", "shadow"):
            named[key] = obj.get(key)
            if named[key] is not None and not isinstance(named[key], str):
                raise StoreError(f"the store index is malformed: task {shown(task)} has {key} {shown(named[key], 20)}")
        if named["shadow"] == named["active"]:  # a release without shadows activated it: it is active, not both
            named["shadow"] = None
        return cls(versions, named["active"], named["shadow"])

    def to_json(self) -> dict[str, Any]:
        shadow = {"shadow": self.shadow} if self.shadow is not None else {}  # an older release reads it as absent
        return {"active": self.active, **shadow, "versions": [v.to_json() for v in self.versions]}

    def with_gate(self, gate: Mapping[str, Any] | None) -> TaskRecord:
        """A copy whose gate report of the version `gate` names (its `version`) is `gate` (None: as it is)."""
        if gate is None:
            return self
        return replace(
            self,
            versions=tuple(replace(v, gate=gate) if v.version == gate.get("version") else v for v in self.versions),
        )

    @property
    def newest(self) -> int:
        return max((v.version for v in self.versions), default=0)

    def active_record(self) -> VersionRecord | None:
        return self.record_of(self.active)

    def record_of(self, bundle_id: str | None) -> VersionRecord | None:
        return next((v for v in self.versions if v.bundle_id == bundle_id), None)


@dataclass(frozen=True)
class StoreIndex:
    """Every task of a store. `generation` grows by one with every change; servers poll it."""

    generation: int = 0
    tasks: Mapping[str, TaskRecord] = field(default_factory=dict)
    format: int = INDEX_FORMAT
    # {bundle id: unix time}: blobs a purge is deleting (object stores only; no put may name them until it is done)
    deleting: Mapping[str, float] = field(default_factory=dict)
    # made by the first change (random): a store wiped and made again under a running server is another store
    store_id: str | None = None
    # the generation that made `store_id`: later than a first change when an older release's write had dropped it
    store_id_since: int | None = None

    @classmethod
    def from_json(cls, obj: Any) -> StoreIndex:
        if not isinstance(obj, dict):
            raise StoreError(f"the store index is a JSON {type(obj).__name__}, not an object")
        for key, kind, name in (("generation", int, "a whole number"), ("tasks", dict, "an object")):
            if key not in obj:
                raise StoreError(f"the store index lacks {key!r}")
            if type(obj[key]) is not kind:  # 7.5, "7" and true are no generation; a list is no task table
                raise StoreError(f"the store index's {key!r} is {cut(json.dumps(obj[key]), 20)}, not {name}")
        if not 0 <= obj["generation"] <= MAX_GENERATION:  # clients read it as a JSON number (X-Generation too)
            raise StoreError(f"the store index has generation {shown(obj['generation'], 20)}, not one of 0..2^53-1")
        tasks = {name: TaskRecord.from_json(entry, name) for name, entry in obj["tasks"].items()}
        deleting = obj.get("deleting") if isinstance(obj.get("deleting"), dict) else {}
        deleting = {k: float(v) for k, v in deleting.items() if ID_RE.fullmatch(k) and _finite(v)}
        fmt = obj.get("format", INDEX_FORMAT)
        if type(fmt) is not int or fmt < 1:
            raise StoreError(f"the store index has format {shown(fmt, 20)}, not a format number")
        store_id = obj.get("store_id")
        store_id = store_id if isinstance(store_id, str) and STORE_ID_RE.fullmatch(store_id) else None
        since = obj.get("store_id_since")
        since = since if type(since) is int and store_id is not None else None
        return cls(obj["generation"], tasks, fmt, deleting, store_id, since)

    def to_json(self) -> dict[str, Any]:
        out = {
            "format": self.format,
            "generation": self.generation,
            "tasks": {name: t.to_json() for name, t in self.tasks.items()},
        }
        if self.deleting:  # written only when set, so older releases read the index unchanged
            out["deleting"] = dict(self.deleting)
        if self.store_id is not None:  # older releases ignore it (and drop it when they write)
            out["store_id"] = self.store_id
        if self.store_id_since is not None:
            out["store_id_since"] = self.store_id_since
        return out

    def task(self, name: str) -> TaskRecord:
        if name not in self.tasks:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise TaskNotFound(f"task {shown(name)} is not in the store; known: {known}")
        return self.tasks[name]

    def version(self, task: str, version: int) -> VersionRecord:
        if isinstance(version, bool) or not hasattr(version, "__index__"):  # "1" read "has no version '1'"
            raise TypeError(f"a version is a whole number, got {type(version).__name__} {shown(version, 20)}")
        record = self.task(task)
        for v in record.versions:
            if v.version == version:
                return v
        have = ", ".join(str(v.version) for v in record.versions)
        raise VersionNotFound(f"task {shown(task)} has no version {shown(version, 20)}; stored versions: {have}")

    def active(self) -> dict[str, str]:
        """{task: active bundle id} for every task that has one."""
        return {name: t.active for name, t in self.tasks.items() if t.active}

    def shadows(self) -> dict[str, str]:
        """{task: bundle id in shadow} for every task that has one."""
        return {name: t.shadow for name, t in self.tasks.items() if t.shadow}

    def records(self) -> Iterator[tuple[str, VersionRecord]]:
        for name, t in self.tasks.items():
            for v in t.versions:
                yield name, v

    def record_problems(self, whole: Mapping[str, tuple[str, int] | None]) -> list[str]:
        """Records that say another task or version than their blob's own manifest, `whole` ({bundle id: (task,
        version)}): a hand edit. Servers route by the manifest, so `clipbank tasks` would list what is not served."""
        return [
            f"task {shown(task)} version {v.version}: its blob {v.bundle_id[:12]} is {shown(own[0])} version "
            f"{own[1]} (index.json was edited?)"
            for task, v in self.records()
            if (own := whole.get(v.bundle_id)) is not None and own != (task, v.version)
        ]

    def owner(self, bundle_id: str) -> tuple[str, VersionRecord] | None:
        """(task, version record) of the stored version whose blob is `bundle_id`, or None."""
        return next(((name, v) for name, v in self.records() if v.bundle_id == bundle_id), None)

    def expert_sources(self) -> dict[str, str]:
        """{expert id: id of the bundle that added it}, over every stored version."""
        out: dict[str, str] = {}
        for _, v in self.records():
            for eid in v.experts_new:
                out.setdefault(eid, v.bundle_id)
        return out

    def with_task(self, name: str, change: Callable[[TaskRecord], TaskRecord | None]) -> StoreIndex:
        """A copy with task `name` (empty if absent) replaced by `change(record)`; None removes the task."""
        tasks = dict(self.tasks)
        new = change(tasks.get(name, TaskRecord()))
        if new is None:
            tasks.pop(name, None)
        else:
            tasks[name] = new
        return replace(self, tasks=tasks)


def refuse_too_new(index: StoreIndex) -> None:
    """StoreTooNew for an index a newer release wrote: it may name blobs in fields this release does not read, so
    nothing here changes that store or deletes from it."""
    if index.format > INDEX_FORMAT:
        raise StoreTooNew(
            f"the store index is format {index.format}, written by a newer clipbank; this release (format "
            f"{INDEX_FORMAT}) serves from it but does not change it: upgrade to change the store"
        )


def stored_already(bundle: Bundle, index: StoreIndex, how: str = "") -> str:
    """Why the very bundle stored is refused, and what to do instead (an outside check: pushed in shadow again, it
    was told only that a new bundle needs a higher version)."""
    task, version = bundle.task, bundle.version
    record = index.tasks.get(task)
    what = f"this bundle is stored already{how}: task {task!r} version {version} (bundle {bundle.id[:12]})"
    if record is not None and record.active == bundle.id:
        return f"{what}, and active; a new bundle needs a higher version"
    return (
        f"{what}: activate it or put it in shadow as stored (`clipbank tasks activate {task} {version}`, "
        f"`clipbank shadow {task} --version {version}`); a new bundle needs a higher version"
    )


def conflict_details(bundle: Bundle, index: StoreIndex) -> dict[str, Any]:
    """A version conflict's `details`, for a program to branch on without reading the message (an outside check: a
    push retried after a timeout could not tell its own landed bundle from another holding the version):
    `same_bytes` (this very bundle is stored) with its `state` (active, shadow, inactive), and the task's `newest`."""
    record = index.tasks.get(bundle.task)
    same = index.owner(bundle.id) is not None
    state = None
    if same and record is not None:
        state = "active" if record.active == bundle.id else "shadow" if record.shadow == bundle.id else "inactive"
    newest = record.newest if record is not None else 0
    return {"task": bundle.task, "version": bundle.version, "same_bytes": same, "state": state, "newest": newest}


def refuse_stored_version(index: StoreIndex, bundle: Bundle) -> None:
    """VersionConflict unless `bundle` is newer than every stored version of its task."""
    newest = index.tasks[bundle.task].newest if bundle.task in index.tasks else 0
    if bundle.version <= newest and index.owner(bundle.id) is not None:  # the same bytes, stored meanwhile
        raise VersionConflict(stored_already(bundle, index), conflict_details(bundle, index))
    if bundle.version <= newest:
        raise VersionConflict(
            f"task {bundle.task!r} already has version {newest}; a new bundle needs version > {newest}, "
            f"got {bundle.version} (train it with `--version {newest + 1}` (in Python `version={newest + 1}`), or on "
            "this store with `--store`; "
            "an older version cannot be added after a newer one)",
            conflict_details(bundle, index),
        )


def next_generation(index: StoreIndex, known_id: str | None = None) -> StoreIndex:
    """The changed index, one generation on, with its store id: `known_id` (the one the writer read before) when
    an older release's write dropped it, else a new one; either marked with this generation (`store_id_since`).
    A StoreError for an index of a newer format, which this release reads but cannot rewrite without losing
    what it does not know."""
    refuse_too_new(index)
    generation = index.generation + 1
    if generation > MAX_GENERATION:  # written, it would be refused as malformed at the next read
        raise StoreError(f"the store is at its last generation ({index.generation}): no change can be made")
    if index.store_id is not None:
        return replace(index, generation=generation)
    # dropped by an older release (or never made): put back, or made, at this generation; either way marked, as a
    # reader may have taken another id since the one put back (only this store's writers can hold it)
    return replace(index, generation=generation, store_id=known_id or uuid.uuid4().hex, store_id_since=generation)

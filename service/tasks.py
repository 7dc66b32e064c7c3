"""What `GET /tasks` says about a task: its stored versions, the active one, and what this server serves."""

from __future__ import annotations

from typing import Any

from model_store.bank import BankSnapshot
from model_store.store_index import TaskRecord, VersionRecord


def _version_info(v: VersionRecord) -> dict[str, Any]:
    return {
        "version": v.version,
        "bundle_id": v.bundle_id,
        "created_at": v.created_at,
        "stored_at": v.stored_at,
        "bytes": v.bytes,
        "experts_added": len(v.experts_new),
        "classes": list(v.classes) if v.classes is not None else None,
        "metrics": dict(v.metrics),
        "gate": dict(v.gate) if v.gate is not None else None,
    }


def task_info(bank: BankSnapshot, name: str, entry: TaskRecord, generation: int | None = None) -> dict[str, Any]:
    """The API's view of one task: from the store's index record and what `bank` (this server's) routes to;
    `generation`: the store generation the record was read at (None: this server's bank's)."""
    active = entry.active_record()
    served = next((t for t in bank.tasks if t.name == name), None)
    serving = served is not None and served.bundle_id == entry.active
    if serving:
        classes, size = list(served.classes), served.file_bytes
    elif active is not None:  # not (yet) in this server's bank: another server changed it, or it is degraded
        classes, size = list(active.classes or ()), active.bytes
    else:
        classes, size = [], 0
    return {
        "task": name,
        "active_version": active.version if active else None,
        "serving": serving,
        "serving_version": served.version if served is not None else None,
        "degraded": bank.degraded.get(name),
        "classes": classes,
        "versions": [_version_info(v) for v in entry.versions],
        "bytes": size,
        "shadow_version": shadow.version if (shadow := entry.record_of(entry.shadow)) is not None else None,
        "shadow_degraded": bank.shadow_degraded.get(entry.shadow) if entry.shadow is not None else None,
        # for X-Min-Generation (a change's answer puts the one serving it): null made min_generation=None
        "generation": bank.generation if generation is None else generation,
    }

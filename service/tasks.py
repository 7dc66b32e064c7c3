"""What `GET /tasks` says about a task: its stored versions, the active one, and what this server serves."""

from __future__ import annotations

from typing import Any

from .registry import Registry


def task_info(registry: Registry, name: str, entry: dict[str, Any]) -> dict[str, Any]:
    bank = registry.bank
    active_id = entry.get("active")
    versions = [
        {
            "version": v["version"],
            "bundle_id": v["bundle_id"],
            "created_at": v.get("created_at"),
            "stored_at": v.get("stored_at"),
            "bytes": v.get("bytes", 0),
            "experts_added": len(v.get("experts_new", [])),
            "classes": v.get("classes"),
            "metrics": v.get("metrics") or {},
        }
        for v in entry["versions"]
    ]
    active = next((v for v in versions if v["bundle_id"] == active_id), None)
    served = next((t for t in bank.tasks if t.name == name), None)
    if served is not None and served.bundle_id == active_id:
        classes, nbytes = list(served.classes), served.nbytes
    elif active_id is not None:  # active in the store, not yet in this server's bank (another server changed it)
        bundle = registry.store.load(active_id)  # not through the loader, whose cache holds only what is served
        classes, nbytes = list(bundle.manifest["classes"]), bundle.nbytes
    else:
        classes, nbytes = [], 0
    return {
        "task": name,
        "active_version": active["version"] if active else None,
        "serving": served is not None,
        "classes": classes,
        "versions": versions,
        "bytes": nbytes,
    }

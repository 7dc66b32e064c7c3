"""What `GET /tasks` says about a task: its stored versions, the active one, and what this server serves."""

from __future__ import annotations

import math
from typing import Any

from model_store.bank import BankSnapshot


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _version_info(v: dict[str, Any]) -> dict[str, Any]:
    """One version's entry, with every field coerced to the API's types (an index written by hand or by an older
    release must not break the listing)."""
    classes = v.get("classes")
    metrics = v.get("metrics")
    return {
        "version": v["version"],
        "bundle_id": v["bundle_id"],
        "created_at": v.get("created_at") if isinstance(v.get("created_at"), str) else None,
        "stored_at": v.get("stored_at") if isinstance(v.get("stored_at"), str) else None,
        "bytes": v.get("bytes") if isinstance(v.get("bytes"), int) else 0,
        "experts_added": len(v.get("experts_new") or []) if isinstance(v.get("experts_new"), list) else 0,
        "classes": [c for c in classes if isinstance(c, str)] if isinstance(classes, list) else None,
        "metrics": {k: m for k, m in metrics.items() if _number(m)} if isinstance(metrics, dict) else {},
    }


def _valid_version(v: Any) -> bool:
    return isinstance(v, dict) and isinstance(v.get("version"), int) and isinstance(v.get("bundle_id"), str)


def task_info(bank: BankSnapshot, name: str, entry: Any) -> dict[str, Any]:
    """The API's view of one task: from the store's index entry and what `bank` (this server's) routes to."""
    entry = entry if isinstance(entry, dict) else {}
    active_id = entry.get("active")
    versions = [_version_info(v) for v in entry.get("versions") or [] if _valid_version(v)]
    active = next((v for v in versions if v["bundle_id"] == active_id), None)
    served = next((t for t in bank.tasks if t.name == name), None)
    serving = served is not None and served.bundle_id == active_id
    if serving:
        classes, size = list(served.classes), served.file_bytes
    elif active is not None:  # not (yet) in this server's bank: another server changed it, or it is degraded
        classes, size = active["classes"] or [], active["bytes"]
    else:
        classes, size = [], 0
    return {
        "task": name,
        "active_version": active["version"] if active else None,
        "serving": serving,
        "serving_version": served.version if served is not None else None,
        "degraded": bank.degraded.get(name),
        "classes": classes,
        "versions": versions,
        "bytes": size,
    }

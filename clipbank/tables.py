"""Tasks and their versions as a table a person reads: `clipbank store list` and `clipbank tasks`.

Both print the same columns, from the same shape (the API's `GET /tasks` entries); `--json` gives the data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from model_store.replacement import partial_classes

if TYPE_CHECKING:  # building the command line loads no torch
    from model_store.store_index import StoreIndex

COLUMNS = ("TASK", "VERSION", "STATE", "CLASSES", "SIZE", "TRAINED", "VAL ACC", "ZERO-SHOT")


def index_tasks(index: StoreIndex) -> list[dict[str, Any]]:
    """A store index's tasks in the API's shape (what `GET /tasks` lists, without what a server serves)."""
    out = []
    for name, record in sorted(index.tasks.items()):
        active, shadow = record.active_record(), record.record_of(record.shadow)
        out.append(
            {
                "task": name,
                "active_version": active.version if active else None,
                "shadow_version": shadow.version if shadow else None,
                "versions": [v.to_json() for v in record.versions],
            }
        )
    return out


def print_tasks(generation: int, tasks: list[dict[str, Any]], where: str) -> None:
    """One row per stored version, oldest first; a line above names the generation and the counts."""
    versions = sum(len(t["versions"]) for t in tasks)
    if not tasks:
        print(f"{where}: no task stored (generation {generation})")
        return
    print(f"{where}: generation {generation}, {len(tasks)} task(s), {versions} version(s)")
    rows = [COLUMNS] + [_row(t, v) for t in tasks for v in t["versions"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    for t in tasks:  # the reasons below the table: one of ~250 characters widened the STATE column for all
        if t.get("degraded") and not t.get("serving", True):
            print(f"{t['task']} is not served: {t['degraded']}")
        if t.get("shadow_degraded"):
            print(f"the version of {t['task']} in shadow is not scored: {t['shadow_degraded']}")


def _row(task: dict[str, Any], v: dict[str, Any]) -> tuple[str, ...]:
    metrics = v.get("metrics") or {}
    classes = v.get("classes")
    return (
        task["task"],
        str(v["version"]),
        _state(task, v["version"]),
        "-" if classes is None else str(len(classes)),
        _size(v.get("bytes") or 0),
        (v.get("created_at") or "-").replace("T", " ")[:16],
        _share(metrics.get("val_accuracy")) + partial_classes(metrics.get("val_classes"), classes),
        _share(metrics.get("zero_shot_val_accuracy")),
    )


def _state(task: dict[str, Any], version: int) -> str:
    states = []
    if version == task.get("active_version"):
        states.append("active" + _served(task))
    if version == task.get("shadow_version"):
        failed = task.get("shadow_degraded")
        states.append("shadow" + (f" (not scored: {str(failed).split(':', 1)[0]})" if failed else ""))
    return ", ".join(states) or "-"


def _served(task: dict[str, Any]) -> str:
    """From a server's listing: what it routes to, where that is not the active version."""
    if "serving" not in task or task["serving"]:
        return ""
    if task.get("degraded"):  # its code; the whole reason is printed below the table
        return f" (not served: {str(task['degraded']).split(':', 1)[0]})"
    serving = task.get("serving_version")
    return f" (this server still serves v{serving})" if serving is not None else " (not served yet)"


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"

"""The soak's store changes: every few seconds one task is flipped, deleted, re-activated or given a new version."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from model_store.bundle import pack_bundle, read_bundle
from service.client import ClipbankClient

from .timeline import ANY, Timeline

# What the i-th change of one task does; the tasks take turns.
CYCLE = ("flip", "delete", "reactivate", "flip", "push")


def revised_bundle(data: bytes, version: int) -> bytes:
    """The same bundle re-issued as `version` (same experts, routers and selector; a new bundle id)."""
    b = read_bundle(data)
    manifest = {k: v for k, v in b.manifest.to_json().items() if k not in ("format", "content_sha256")}
    manifest.update(version=version, parent=b.id)
    return pack_bundle(manifest, b.experts, b.routers, b.selector_tensors)


@dataclass
class TaskState:
    """What the swapper believes about one task: its versions' bundle ids and the active version."""

    name: str
    first: bytes  # version 1's bundle, re-issued for each new version
    versions: dict[int, str] = field(default_factory=dict)
    active: int | None = None

    def bundle(self, version: int | None) -> str | None:
        return None if version is None else self.versions[version]


class Swapper:
    """Runs one change every `every` seconds on its own thread, recording each in the timeline and in `records`."""

    def __init__(self, url: str, token: str, tasks: list[TaskState], timeline: Timeline, every: float) -> None:
        self.url, self.token, self.tasks, self.timeline, self.every = url, token, tasks, timeline, every
        self.records: list[dict[str, Any]] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="swapper", daemon=True)

    def __enter__(self) -> Swapper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)
        if self._thread.is_alive():
            raise TimeoutError("the swapper's last change did not return within 120 s")

    def _run(self) -> None:
        with ClipbankClient(self.url, self.token, timeout=60) as admin:
            start, n = time.monotonic(), 0
            while not self._stop.wait(max(0.0, start + (n + 1) * self.every - time.monotonic())):
                task = self.tasks[n % len(self.tasks)]
                self.records.append(self.change(admin, task, CYCLE[(n // len(self.tasks)) % len(CYCLE)]))
                n += 1

    def change(self, admin: ClipbankClient, task: TaskState, action: str) -> dict[str, Any]:
        """Do `action` to `task` through the admin API; on failure read back what is active."""
        if action == "delete" and task.active is None:
            action = "reactivate"
        elif action == "reactivate" and task.active is not None:
            action = "flip"
        start = time.monotonic()
        error = None
        try:
            task.active = self._apply(admin, task, action)
            active = task.bundle(task.active)
        except Exception as e:  # an HTTP or transport error is counted and read back, not fatal
            self.failures += 1
            error = f"{type(e).__name__}: {str(e)[:200]}"
            active = self._read_back(admin, task)
        end = time.monotonic()
        self.timeline.record(task.name, start, end, active)
        return {
            "t": start,
            "seconds": round(end - start, 4),
            "task": task.name,
            "action": action,
            "version": task.active,
            "ok": error is None,
            "error": error,
        }

    @staticmethod
    def _apply(admin: ClipbankClient, task: TaskState, action: str) -> int | None:
        if action == "delete":
            admin.delete(task.name)
            return None
        if action == "push":
            version = max(task.versions) + 1
            up = admin.push(revised_bundle(task.first, version))
            task.versions[version] = up["bundle_id"]
            return version
        newest = max(task.versions)
        target = newest if action == "reactivate" or task.active != newest else 1
        admin.activate(task.name, target)
        return target

    @staticmethod
    def _read_back(admin: ClipbankClient, task: TaskState) -> str | None:
        """The active bundle as the server reports it after a failed change; ANY if even that fails."""
        try:
            entry = admin.task(task.name)
        except Exception:  # the outcome stays unknown
            return ANY
        task.active = entry["active_version"]
        by_version = {v["version"]: v["bundle_id"] for v in entry["versions"]}
        task.versions.update(by_version)
        return by_version.get(task.active) if task.active is not None else None

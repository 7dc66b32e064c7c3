"""Which bundle each task had active over time, so an answer's route can be checked against its request's span."""

from __future__ import annotations

import threading

ANY = "*"  # a change whose outcome is unknown: any bundle may have been active after it


class Timeline:
    """Per task: the bundle active before any change, then each change as (start, end, bundle left active).

    A change's new state may hold from the instant the change starts until the next change ends, so the bundles
    possible during [a, b] are every state whose span meets it. None means the task was not active.
    """

    def __init__(self, initial: dict[str, str | None]) -> None:
        self._initial = dict(initial)
        self._ops: dict[str, list[tuple[float, float, str | None]]] = {task: [] for task in initial}
        self._lock = threading.Lock()

    def record(self, task: str, start: float, end: float, active: str | None) -> None:
        with self._lock:
            self._ops[task].append((start, end, active))

    def changes(self) -> int:
        return sum(len(ops) for ops in self._ops.values())

    def possible(self, task: str, a: float, b: float) -> set[str | None]:
        """Bundles of `task` that may have been active at some instant of [a, b] (only None for unknown tasks)."""
        with self._lock:
            ops = list(self._ops.get(task, ()))
        states = [(float("-inf"), self._initial.get(task))] + [(start, active) for start, _, active in ops]
        ends = [end for _, end, _ in ops] + [float("inf")]
        return {active for (start, active), end in zip(states, ends, strict=True) if start <= b and end >= a}

    def allows(self, task: str, bundle_id: str | None, a: float, b: float) -> bool:
        possible = self.possible(task, a, b)
        return bundle_id in possible or ANY in possible

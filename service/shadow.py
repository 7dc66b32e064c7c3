"""What each version in shadow would do to live traffic: counted per version from when it entered the shadow, for
`GET /tasks/{task}/shadow` and Prometheus (docs/safety.md)."""

from __future__ import annotations

import bisect
import math
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from model_store.bank import ShadowEntry
from model_store.modes import ZERO_SHOT
from model_store.shadow import ShadowSeen

from .metrics import SCORE_BUCKETS, Metrics


@dataclass
class ShadowStats:
    """One version in shadow: auto-routed images it scored, those it would take, from where, and its scores."""

    task: str
    version: int
    bundle_id: str
    against: str | None = None  # its task's active bundle served when counting began: figures are against it
    # to the millisecond: figures that restart (an activation) within the second they began kept the same `since`
    since: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="milliseconds"))
    images: int = 0
    claimed: int = 0
    taken_from: Counter = field(default_factory=Counter)
    buckets: list[int] = field(default_factory=lambda: [0] * len(SCORE_BUCKETS))

    def add(self, seen: ShadowSeen) -> Counter:
        """Count a batch; returns what it would take in this batch, by route."""
        taken = Counter(
            route or ZERO_SHOT for route, claimed in zip(seen.routes, seen.claimed.tolist(), strict=True) if claimed
        )
        self.images += len(seen.scores)
        self.claimed += sum(taken.values())
        self.taken_from.update(taken)
        for s in seen.scores.tolist():
            self.buckets[min(bisect.bisect_left(SCORE_BUCKETS, s), len(SCORE_BUCKETS) - 1)] += 1
        return taken

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "version": self.version,
            "bundle_id": self.bundle_id,
            "since": self.since,
            "images": self.images,
            "would_claim": self.claimed,
            "claim_rate": self.claimed / self.images if self.images else None,
            "taken_from": dict(self.taken_from.most_common()),
            "score_histogram": {
                "le": [b if b != float("inf") else "+Inf" for b in SCORE_BUCKETS],
                "counts": list(self.buckets),
            },
        }


class ShadowMonitor:
    """Thread-safe: the compute thread records, endpoints read. Figures restart when a task's shadow version
    changes, or the version of its task that is served (one comparison, not two mixed)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._stats: dict[str, ShadowStats] = {}
        self._lock = threading.Lock()

    def follow(
        self, shadows: Iterable[ShadowEntry], served: Mapping[str, str] | None = None, degraded: Iterable[str] = ()
    ) -> None:
        """The bank now serves these shadows, and `served` ({task: bundle id}): keep their figures, start new ones'
        (also of a shadow whose task now serves another version, or none, unless it is only `degraded` for now: a
        passing store error), drop the rest."""
        served, degraded = served or {}, set(degraded)
        with self._lock:
            old, self._stats = self._stats, {}
            for s in shadows:
                kept, against = old.get(s.name), served.get(s.name)
                same = (
                    kept is not None
                    and kept.bundle_id == s.bundle_id
                    and (kept.against == against or s.name in degraded)
                )
                self._stats[s.name] = kept if same else ShadowStats(s.name, s.version, s.bundle_id, against)
            ended = [stats for task, stats in old.items() if self._stats.get(task) is not stats]
        for stats in ended:  # its series go too: they would mix versions, and tasks come and go
            self._forget(stats)

    def _forget(self, stats: ShadowStats) -> None:
        m = self.metrics
        for metric, labels in [
            (m.shadow_images, (stats.task,)),
            (m.shadow_score, (stats.task,)),
            *[(m.shadow_claims, (stats.task, route)) for route in stats.taken_from],
        ]:
            try:
                metric.remove(*labels)
            except KeyError:  # never observed
                pass

    def record(self, seen: Iterable[ShadowSeen]) -> None:
        m = self.metrics
        for s in seen:
            with self._lock:
                stats = self._stats.get(s.task)
                if stats is None or stats.bundle_id != s.bundle_id:  # a batch of the bank before the swap
                    continue
                taken = stats.add(s)
            m.shadow_images.labels(task=s.task).inc(len(s.scores))
            for route, n in taken.items():
                m.shadow_claims.labels(task=s.task, taken_from=route).inc(n)
            histogram = m.shadow_score.labels(task=s.task)
            for value in s.scores.tolist():
                if math.isfinite(value):  # a selector scoring inf made the series' sum +Inf for good (rate() useless)
                    histogram.observe(value)

    def stats(self, task: str) -> dict[str, Any] | None:
        with self._lock:
            stats = self._stats.get(task)
            return stats.to_json() if stats is not None else None

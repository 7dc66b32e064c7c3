"""Build bank snapshots from a store: the active bundles plus the older bundles whose experts they use."""

from __future__ import annotations

import threading

from .backbone import Backbone
from .bank import BankSnapshot, build_bank
from .bundle import Bundle
from .errors import MissingExpert
from .store import LocalStore


class BankLoader:
    """Loads bundles once (they are immutable, so cached by id) and builds snapshots of the store's state."""

    def __init__(self, store: LocalStore, backbone: Backbone) -> None:
        self.store = store
        self.backbone = backbone
        self._bundles: dict[str, Bundle] = {}
        self._lock = threading.Lock()

    def bundle(self, bundle_id: str) -> Bundle:
        with self._lock:
            cached = self._bundles.get(bundle_id)
        if cached is None:
            cached = self.store.load(bundle_id)
            with self._lock:
                self._bundles[bundle_id] = cached
        return cached

    def remember(self, bundle: Bundle) -> None:
        with self._lock:
            self._bundles[bundle.id] = bundle

    def providers(self, tasks: list[Bundle]) -> list[Bundle]:
        """The stored bundles that add the experts `tasks` use but do not add themselves (transitively)."""
        sources = self.store.expert_sources()
        have = {e for b in tasks for e in b.experts}
        wanted = [e for b in tasks for e in b.uses if e not in have]
        out: dict[str, Bundle] = {}
        while wanted:
            eid = wanted.pop()
            if eid in have:
                continue
            if eid not in sources:
                raise MissingExpert(f"expert {eid[:12]} is used by an active task but no stored bundle adds it")
            b = self.bundle(sources[eid])
            out[b.id] = b
            have.update(b.experts)
        return list(out.values())

    def load(self, previous: BankSnapshot | None = None) -> BankSnapshot:
        """A snapshot of the store's active versions, sharing tensors with `previous` where they are the same."""
        index = self.store.index()
        active = [e["active"] for e in index["tasks"].values() if e.get("active")]
        tasks = [self.bundle(bid) for bid in active]
        return build_bank(self.backbone, tasks, self.providers(tasks), int(index["generation"]), previous)

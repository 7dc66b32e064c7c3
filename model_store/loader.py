"""Build bank snapshots from a store: the active bundles plus the older bundles whose experts they use."""

from __future__ import annotations

import threading
from collections.abc import Mapping

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
        self._in_use: set[str] = set()
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

    def load(
        self, previous: BankSnapshot | None = None, overrides: Mapping[str, Bundle | None] | None = None
    ) -> BankSnapshot:
        """A snapshot of the store's active versions, sharing tensors with `previous` where they are the same.

        `overrides` replaces a task's active version (None: no version) without touching the store, so a
        change can be checked by building the bank it would give before the change is written.
        """
        index = self.store.index()
        active = {t: e["active"] for t, e in index["tasks"].items() if e.get("active")}
        tasks = {t: self.bundle(bid) for t, bid in active.items()}
        for task, bundle in (overrides or {}).items():
            tasks.pop(task, None)
            if bundle is not None:
                tasks[task] = bundle
        chosen = list(tasks.values())
        providers = self.providers(chosen)
        bank = build_bank(self.backbone, chosen, providers, int(index["generation"]), previous)
        if not overrides:
            self._in_use = {b.id for b in (*chosen, *providers)}
        return bank

    def trim(self) -> int:
        """Forget cached bundles the last `load()` did not use (they are re-read if needed); returns how many."""
        with self._lock:
            unused = set(self._bundles) - self._in_use
            for bid in unused:
                del self._bundles[bid]
        return len(unused)

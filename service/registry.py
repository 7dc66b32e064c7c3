"""The served bank and every change to it: validate, write the store, build a new snapshot, swap one reference."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from model_store.backbone import Backbone
from model_store.bank import BankSnapshot
from model_store.bundle import Bundle, read_bundle
from model_store.errors import VersionConflict, VersionNotFound
from model_store.loader import BankLoader
from model_store.store import LocalStore, PutResult

from .metrics import Metrics

log = logging.getLogger("clipbank.service")
T = TypeVar("T")


class Registry:
    """Holds the current `BankSnapshot`. Readers take `registry.bank` once and keep using that object.

    Changes are serialised by one lock, and each is checked by building the bank it would give *before* the
    store is written, so a bad upload or activation changes neither the store nor what is served.
    """

    def __init__(self, store: LocalStore, backbone: Backbone, metrics: Metrics | None = None) -> None:
        self.store = store
        self.loader = BankLoader(store, backbone)
        self.metrics = metrics or Metrics()
        self._change_lock = threading.Lock()
        self._bank: BankSnapshot | None = None

    @property
    def bank(self) -> BankSnapshot:
        bank = self._bank
        if bank is None:
            raise RuntimeError("registry.load() has not run")
        return bank

    def load(self) -> BankSnapshot:
        """Build the bank from the store (at start-up)."""
        with self._change_lock:
            return self._rebuild()

    def _rebuild(self) -> BankSnapshot:
        t0 = time.perf_counter()
        bank = self.loader.load(self._bank)
        self._bank = bank  # the swap: one reference assignment
        seconds = time.perf_counter() - t0
        self.metrics.observe_bank(bank, seconds)
        log.info("bank generation %d: %d tasks, swapped in %.3fs", bank.generation, len(bank.tasks), seconds)
        return bank

    def _change(self, overrides: dict[str, Bundle | None], write: Callable[[], T]) -> T:
        """Check the bank `overrides` would give, write the store, then rebuild from the store and swap."""
        with self._change_lock:
            try:
                self.loader.load(self._bank, overrides)  # raises on anything the new bank could not serve
            except Exception:
                self.metrics.swap_failures.inc()
                raise
            result = write()
            self._rebuild()
            return result

    def refresh(self) -> bool:
        """Swap in the store's state if another process changed it; True if a new bank was swapped in."""
        if self.store.generation() == self.bank.generation:
            return False
        with self._change_lock:
            if self.store.generation() == self.bank.generation:
                return False
            try:
                self._rebuild()
            except Exception:
                self.metrics.swap_failures.inc()
                log.exception(
                    "the store changed but its bank could not be built; still serving generation %d",
                    self.bank.generation,
                )
                return False
            return True

    # ------------------------------------------------------------------------------------------- changes

    def upload(self, data: bytes, activate: bool = True) -> PutResult:
        bundle = read_bundle(data)  # format, schema and integrity, before any lock
        newest = max((v["version"] for v in self._versions(bundle.task)), default=0)
        if bundle.version <= newest:  # cheap early answer; store.put checks again under its lock
            raise VersionConflict(
                f"task {bundle.task!r} already has version {newest}; a new bundle needs version > {newest}, "
                f"got {bundle.version}"
            )
        overrides = {bundle.task: bundle} if activate else {}

        def write() -> PutResult:
            result = self.store.put(data, activate=activate)
            self.loader.remember(bundle)  # the rebuild then needs no second parse
            return result

        return self._change(overrides, write)

    def activate(self, task: str, version: int) -> str:
        entry = self.store.task(task)
        found = [v for v in entry["versions"] if v["version"] == version]
        if not found:
            have = ", ".join(str(v["version"]) for v in entry["versions"])
            raise VersionNotFound(f"task {task!r} has no version {version}; stored versions: {have}")
        bundle = self.loader.bundle(found[0]["bundle_id"])
        return self._change({task: bundle}, lambda: self.store.activate(task, version))

    def deactivate(self, task: str, purge: bool = False) -> int:
        """Stop routing to `task`; with purge, also forget it and delete blobs no other task needs."""
        self.store.task(task)  # TaskNotFound before anything else

        def write() -> int:
            if self.store.task(task).get("active"):
                self.store.deactivate(task)
            return self.store.purge(task) if purge else 0

        return self._change({task: None}, write)

    def _versions(self, task: str) -> list[dict[str, Any]]:
        return self.store.index()["tasks"].get(task, {}).get("versions", [])

"""The served bank and every change to it: validate, write the store, build a new snapshot, swap one reference."""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, TypeVar

from model_store.backbone import Backbone
from model_store.bank import BankSnapshot, empty_bank
from model_store.bundle import Bundle, read_bundle
from model_store.compat import refuse_other_backbone, refuse_second_backbone
from model_store.errors import (
    BackboneMismatch,
    BundleInvalid,
    BundleNotFound,
    InvalidRequest,
    MissingExpert,
    NoShadow,
    ShadowConflict,
    StoreError,
    StoreMoved,
    VersionConflict,
)
from model_store.gate import Gate, GateReport, InterferenceRefused, trusted_serving
from model_store.inference import TextCache
from model_store.labels import unanswerable_class
from model_store.loader import BankLoader
from model_store.manifest import shown
from model_store.store_base import PutResult, Store
from model_store.store_index import (
    StoreIndex,
    TaskRecord,
    conflict_details,
    refuse_stored_version,
    stored_already,
)

from .degraded import DegradedRetry
from .memory import release_free_memory
from .metrics import Metrics
from .warm import encode_classes_in_steps, trial_run

log = logging.getLogger("clipbank.service")
T = TypeVar("T")
REFUSALS = (InterferenceRefused, VersionConflict, InvalidRequest, MissingExpert, BackboneMismatch)  # the request's
CHANGE_TRIES = 3  # checks of a gated change on a store that other servers keep changing (S3), then 503 store_busy


class Registry:
    """Holds the current `BankSnapshot`. Readers take `registry.bank` once and keep using that object.

    Changes are serialised by one lock, and each is checked by building the bank it would give *before* the
    store is written, so a bad upload or activation changes neither the store nor what is served. Once written,
    that checked bank is the one swapped in (one bank build per change).
    """

    def __init__(
        self,
        store: Store,
        backbone: Backbone,
        metrics: Metrics | None = None,
        cache: TextCache | None = None,
        gate: Gate | None = None,
        on_swap: Callable[[BankSnapshot], None] | None = None,
    ) -> None:
        """`on_swap` is told of every bank swapped in (the shadow monitor follows its shadows)."""
        self.on_swap, self.store, self.gate = on_swap, store, gate or Gate()
        self.cache = cache  # the serving text cache: a trial run leaves a new task's class embeddings in it
        self.loader = BankLoader(store, backbone)
        self.metrics = metrics or Metrics()
        self._change_lock = threading.Lock()
        # runs a change's torch work (trial run, gate): the server sets the compute thread's Batcher.run
        self.run_torch: Callable[..., Any] = lambda fn, *args: fn(*args)
        self._bank: BankSnapshot | None = None
        self.store_error: str | None = None  # why the store's index cannot be read, while it cannot
        self.store_read = False  # a bank was built from the store since start-up (else: zero-shot alone, not ready)
        self.retry = DegradedRetry()  # when tasks left out (degraded) are tried again

    @property
    def bank(self) -> BankSnapshot:
        bank = self._bank
        if bank is None:
            raise RuntimeError("registry.load() has not run")
        return bank

    def load(self) -> BankSnapshot:
        """Build the bank from the store (at start-up). Tasks that cannot be served are left out (`degraded`);
        an unreadable index leaves an empty bank, so zero-shot still serves while the store is repaired."""
        with self._change_lock:
            try:
                return self._rebuild()
            except StoreError as e:
                self._store_failed(e)
                self._bank = empty_bank(self.loader.backbone)
                self.metrics.observe_bank(self._bank)
                return self._bank

    def _store_failed(self, error: StoreError) -> None:
        said = self.store.without_location(str(error))  # the open /healthz shows it
        if self.store_error != said:
            serving = f"the last bank (generation {self.generation})" if self.generation is not None else "zero-shot"
            log.error("the store cannot be read: %s; serving %s", error, serving)
        self.store_error = said

    @property
    def generation(self) -> int | None:
        return self._bank.generation if self._bank is not None else None

    def _rebuild(self) -> BankSnapshot:
        t0 = time.perf_counter()
        return self._swap(self.loader.load(self._bank), t0)

    def _swap(self, bank: BankSnapshot, since: float) -> BankSnapshot:
        """Serve `bank` (built from the store's state, or checked then written to it) from now on, with its shadows."""
        try:
            index = self.store.index()
            shadows = self.loader.shadows(index)
            failed = {b: why for b in index.shadows().values() if (why := self.loader.shadow_failure(b))}
            if shadows != bank.shadows or failed != bank.shadow_degraded:  # else what was built and checked serves
                bank = dataclasses.replace(bank, shadows=shadows, shadow_degraded=failed)
        except Exception as e:  # an unreadable index, say: the bank still serves, its shadows as they were built
            log.error("the shadows are not updated: %s", e)
        self._bank = bank  # the swap: one reference assignment
        self.store_error, self.store_read = None, True
        seconds = time.perf_counter() - since
        self.loader.trim()
        release_free_memory()  # what the upload, the old snapshot and the trial run freed
        self.metrics.observe_bank(bank, seconds)
        log.info("bank generation %d: %d tasks, swapped in %.3fs", bank.generation, len(bank.tasks), seconds)
        self.retry.swapped(bank.degraded)
        if self.on_swap is not None:
            self.on_swap(bank)
        return bank

    def _change(
        self,
        overrides: dict[str, Bundle | None],
        write: Callable[[], T],
        changes: int = 1,
        serves: bool = True,
        check: Callable[[BankSnapshot], None] | None = None,
    ) -> T:
        """Check the bank `overrides` would give, write the store, then swap in that same bank.

        The store's lock is held throughout, so no other server's change can slip between check and write. The
        checked bank is stamped with the generation the store will have after `write` makes its `changes` (store
        changes); `serves`: whether the store's active versions are then what `overrides` says. See `_settle`.
        `check` (the interference gate) may refuse the candidate after its trial run; its change is written only
        onto the generation it checked. A store without a lock (S3) may have moved meanwhile: then it is checked
        again on the new state, up to CHANGE_TRIES times, so that no two servers' changes pass the gate unseen
        by each other.
        """
        for attempt in range(1, CHANGE_TRIES + 1):
            try:
                return self._change_once(overrides, write, changes, serves, check)
            except StoreMoved as e:
                if check is None or attempt == CHANGE_TRIES:
                    raise StoreMoved(f"{e}, {attempt} times; other servers are changing it: try again") from None
                log.info("%s: checking the change again on the store's new state", e)
        raise AssertionError("unreachable")

    def _change_once(
        self,
        overrides: dict[str, Bundle | None],
        write: Callable[[], T],
        changes: int,
        serves: bool,
        check: Callable[[BankSnapshot], None] | None,
    ) -> T:
        with self._change_lock, self.store.locked():
            try:
                t0 = time.perf_counter()
                candidate = self.loader.load(self._bank, overrides, changes)  # raises on anything it cannot serve
                built = time.perf_counter() - t0  # counted in the swap time, as when the bank was built again
                new = encode_classes_in_steps(self.run_torch, candidate, overrides, self.cache)  # in chunks
                self.run_torch(trial_run, candidate, new, self.cache)
                if check is not None:  # its model work on the compute thread, its store reads on this one
                    check(candidate)
            except Exception as e:
                if not isinstance(e, REFUSALS):  # the request's fault (the gate, its own bundle) is no failed swap
                    self.metrics.swap_failures.inc()
                raise
            written = None
            try:
                with self.store.based_on(candidate.generation - changes) if check is not None else nullcontext():
                    result = write()
                written = candidate
            finally:  # also after a failed write, which may have changed part of the store
                self._settle(written, changes, serves, time.perf_counter() - built)
            return result

    def _settle(self, candidate: BankSnapshot | None, changes: int, serves: bool, since: float) -> None:
        """After a change's write: serve what the store now holds, building a bank only if need be.

        When the store is at exactly the generation the checked `candidate` was stamped with, it holds what the
        candidate was built from plus this change and nothing else, so the candidate is swapped in as it is (or,
        for a write that activates nothing, the served bank under the new generation). Anything else (a failed
        write, a writer that ignored the lock, a guess of `changes` the write did not match, a degraded bank)
        rebuilds from the store.
        """
        generation = self.store.generation()
        if generation == self._bank.generation:
            return
        if candidate is not None and generation == candidate.generation and not candidate.degraded:
            if serves:
                self.loader.adopt(candidate)
                self._swap(candidate, since)
                return
            if self._bank.generation == generation - changes and not self._bank.degraded:
                self._swap(dataclasses.replace(self._bank, generation=generation), time.perf_counter())
                return
        self._rebuild()

    def refresh(self) -> bool:
        """Swap in the store's state if another process changed it, or if a task was left out for a passing store
        failure (an object store's 503 while its blob was read: nothing else would try it again), or now and then
        for a blob missing or unreadable that may be back (`service/degraded.py`); True if a bank was swapped in."""
        retry = self.retry.due({**self.bank.degraded, **self.bank.shadow_degraded})
        if retry:
            self.loader.retry_shadows()  # a version in shadow left out for a passing reason: read again too
        try:
            if self._current() and not retry:
                return False
        except StoreError as e:
            self._store_failed(e)
            return False
        with self._change_lock:
            try:
                if self._current() and not retry:
                    return False
                self._rebuild()
            except StoreError as e:
                self._store_failed(e)
                return False
            except Exception:
                self.metrics.swap_failures.inc()
                log.exception(
                    "the store changed but its bank could not be built; still serving generation %d",
                    self.bank.generation,
                )
                return False
            return True

    def _current(self) -> bool:
        return self.store.generation() == self.bank.generation and self.store_error is None

    # ------------------------------------------------------------------------------------------- reading

    def index(self) -> StoreIndex:
        """The store's index."""
        return self.store.index()

    def task_entry(self, task: str) -> TaskRecord:
        """A task's index record; TaskNotFound if the store has none."""
        return self.store.task(task)

    # ------------------------------------------------------------------------------------------- changes

    def _gated(
        self, task: str, force: bool, reports: list[GateReport], refuse: bool = True, upload: bool = False
    ) -> Callable[[BankSnapshot], None]:
        """The interference gate as a check of a change's candidate bank: refuse above the limits, unless forced
        (then logged and counted); the report goes to `reports`. `refuse=False` only reports (a shadow upload);
        `upload`: the refusal says the version was not stored (not "not activated")."""

        def check(candidate: BankSnapshot) -> None:
            # what it takes now is not taken anew; read here: on the compute thread, a slow store (S3 answering in
            # 3 s) held every classification that long, once per change (an outside check's)
            serving = trusted_serving(self.bank, self.store.index(), task)
            # on the compute thread, in the request's context: its lines name the request
            report = self.run_torch(contextvars.copy_context().run, self.gate.report, candidate, task, serving)
            reports.append(report)
            if not report.offences() or not refuse:
                return
            if not force:
                self.metrics.gate_refusals.inc()
                raise InterferenceRefused(report, upload=upload)
            self.metrics.gate_overrides.inc()
            log.warning("gate overridden (force) for %s v%d: %s", task, report.version, "; ".join(report.offences()))

        return check

    def upload(self, data: bytes, activate: bool = True, force: bool = False, shadow: bool = False) -> PutResult:
        """Validate, store and (by default) activate a bundle. Checked as if activated either way, the
        interference gate included (`force` overrides it). `shadow`: store it in shadow, not active; the gate then
        only reports (promotion runs it)."""
        if shadow and activate:
            raise InvalidRequest("a version is uploaded either active or in shadow, not both")
        refuse_other_backbone(data, self.loader.backbone)  # from the header, before the tensors are read
        bundle = read_bundle(data)  # format, schema and integrity, before any lock
        if activate or shadow:
            refuse_second_backbone(self.bank.degraded, self.bank.task_names, bundle.task)
        index = self.store.index()
        if index.owner(bundle.id) is not None:
            try:
                return self._restore(bundle, data)
            except BundleNotFound:  # purged since the read above (a DELETE ?purge=true at the same moment): new
                index = self.store.index()
        # a version already stored is refused before the trial run and the gate, whose report would hide why;
        # the write checks again under the store's lock
        refuse_stored_version(index, bundle)
        if (why := unanswerable_class(bundle.manifest.classes)) is not None:  # the store's rule for new bundles,
            raise BundleInvalid(why)  # before the gate: its 409 (or a forced override, counted) hid the 422
        reports: list[GateReport] = []

        def write() -> PutResult:
            gate = _last(reports)
            # read just now: not read again; the gate's report is kept beside the version
            result = self.store.put_validated(bundle, data, activate=activate, gate=gate, shadow=shadow)
            self.loader.remember(bundle)  # later rebuilds then need no second parse
            return result

        check = self._gated(bundle.task, force, reports, refuse=not shadow, upload=True)
        return self._change({bundle.task: bundle}, write, serves=activate, check=check)

    def _restore(self, bundle: Bundle, data: bytes) -> PutResult:
        """The very bytes of a stored version: write its blob back if it is missing or damaged (every task using its
        experts then serves again), else 409. Accepted before, and identical, so neither gate nor trial runs."""
        with self._change_lock:
            generation = self.store.restore(bundle, data)
        if generation is None:  # whole in the store: a task (or shadow) left out while it was not is tried again now
            left_out = self._left_out(bundle)
            if left_out:
                self.retry.now()
                self.refresh()
            if not left_out or (still := self._left_out(bundle)):
                index = self.store.index()
                raise VersionConflict(
                    stored_already(bundle, index, ", whole")
                    + (f"; it is not served (or scored) for another reason: {still}" if left_out else ""),
                    conflict_details(bundle, index),  # same_bytes: a program's push retried after a timeout landed
                )
            generation = self.bank.generation
        else:
            self.refresh()
        log.warning("restored %s v%d (bundle %s): it serves again", bundle.task, bundle.version, bundle.id[:12])
        return PutResult(bundle.task, bundle.version, bundle.id, len(bundle.experts), generation, restored=True)

    def _left_out(self, bundle: Bundle) -> str | None:
        return self.bank.degraded.get(bundle.task) or self.bank.shadow_degraded.get(bundle.id)

    def shadow(self, task: str, version: int | None) -> dict[str, Any] | None:
        """Put a stored version in shadow, checked as if activated (the gate only reports); None: stop shadowing.
        Returns the gate's report (None: nothing ran, as when the version was in shadow already)."""
        if version is None:
            if self.store.task(task).shadow is None:
                raise NoShadow(f"task {shown(task)} has no version in shadow")
            self._change({}, lambda: self.store.set_shadow(task, None), serves=False)
            return None
        record = self.store.version(task, version)
        if record.bundle_id == self.store.task(task).active:  # the store refuses it too; this is before any work
            raise ShadowConflict(f"task {shown(task)} version {version} is active: only another version can shadow it")
        if record.bundle_id == self.store.task(task).shadow:  # in shadow already: no gate, no new generation
            return None
        bundle = self.loader.bundle(record.bundle_id)
        refuse_second_backbone(self.bank.degraded, self.bank.task_names, task)
        reports: list[GateReport] = []
        check = self._gated(task, False, reports, refuse=False)  # the write runs after it: its report is there
        shadowed = self.store.set_shadow
        self._change({task: bundle}, lambda: shadowed(task, version, _last(reports)), serves=False, check=check)
        return _last(reports)

    def activate(self, task: str, version: int, force: bool = False) -> dict[str, Any] | None:
        """Make a stored version active, gated; returns the gate's report (None: it was active, nothing ran)."""
        record = self.store.version(task, version)
        if self.store.task(task).active == record.bundle_id:  # nothing would change: no gate, no new generation
            return None
        bundle = self.loader.bundle(record.bundle_id)
        refuse_second_backbone(self.bank.degraded, self.bank.task_names, task)
        reports: list[GateReport] = []
        gated = self._gated(task, force, reports)
        self._change({task: bundle}, lambda: self.store.activate(task, version, _last(reports)), check=gated)
        return _last(reports)

    def deactivate(self, task: str, purge: bool = False) -> tuple[int, bool]:
        """Stop routing to `task` (purge: forget it too): (blobs deleted, whether it was active, under the lock)."""
        active = self.store.task(task).active  # TaskNotFound before anything else

        def write() -> tuple[int, bool]:
            deactivated = bool(self.store.task(task).active)
            if purge:  # one store change, deactivation included: a kill between two left it deactivated, unpurged
                return self.store.purge(task, deactivate=True), deactivated
            if deactivated:
                self.store.deactivate(task)
            return 0, deactivated

        # How many store changes `write` makes, guessed before the lock: a wrong guess only costs a rebuild.
        return self._change({task: None}, write, changes=1 if purge else int(bool(active)))


def _last(reports: list[GateReport]) -> dict[str, Any] | None:
    return reports[-1].to_json() if reports else None

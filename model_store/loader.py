"""Build bank snapshots from a store: the active bundles plus the older bundles whose experts they use."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

from .backbone import Backbone
from .bank import BankSnapshot, ShadowEntry, bank_config, build_bank, routed_places, shadow_entry
from .bundle import Bundle
from .compat import check_backbone, check_compatible
from .errors import ClipbankError, MissingExpert
from .manifest import shown
from .store_base import Store
from .store_index import StoreIndex

log = logging.getLogger("clipbank.store")


class BankLoader:
    """Loads bundles once (they are immutable, so cached by id) and builds snapshots of the store's state."""

    def __init__(self, store: Store, backbone: Backbone) -> None:
        self.store = store
        self.backbone = backbone
        self._bundles: dict[str, Bundle] = {}
        self._in_use: set[str] = set()
        self._shadows: dict[str, ShadowEntry] = {}  # by bundle id: only the selector is kept
        # by bundle id: why it cannot be scored, and the generation it failed at (read again at another one: a
        # restore publishes one)
        self._shadow_failures: dict[str, tuple[str, int]] = {}
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

    def providers(self, tasks: list[Bundle], sources: Mapping[str, str] | None = None) -> list[Bundle]:
        """The stored bundles that add the experts `tasks` use but do not add themselves (transitively).

        `sources` is `store.expert_sources()` when the caller has it already.
        """
        sources = self.store.expert_sources() if sources is None else sources
        have = {e for b in tasks for e in b.experts}
        wanted = [(e, b) for b in tasks for e in b.uses if e not in have]
        out: dict[str, Bundle] = {}
        while wanted:
            eid, user = wanted.pop()
            if eid in have:
                continue
            if eid not in sources:
                raise MissingExpert(self._missing(user, eid))
            try:
                b = self.bundle(sources[eid])
            except ClipbankError as e:  # say whose: the message alone names a blob the task does not own
                raise _with_context(e, f"it uses the experts of {self._named(sources[eid])}") from None
            out[b.id] = b
            have.update(b.experts)
        return list(out.values())

    def _missing(self, user: Bundle, eid: str) -> str:
        """Why `user` cannot be stored or served: expert `eid` is in no stored bundle. A new version names the
        earlier version it continues when the store no longer holds it (a purge), not "tasks" in general."""
        said = f"task {user.task!r} v{user.version} uses expert {eid[:12]}, which no stored bundle adds: "
        parent = user.manifest.parent
        try:
            gone = parent is not None and self.store.index().owner(parent) is None
        except (ClipbankError, OSError):  # the index cannot be read now: the general advice, not this error
            gone = False
        if gone:
            return said + (
                f"it continues bundle {parent[:12]} (an earlier version of {user.task!r}, trained with --store), which "
                "this store does not hold: store that version and the tasks it was trained on first, in the order "
                "they were trained, then this one"
            )
        return said + (
            "it was trained on top of tasks this store does not hold; store their bundles first, in the order they "
            "were trained"
        )

    def _named(self, bundle_id: str) -> str:
        """A stored bundle as its task and version, for messages."""
        try:
            owner = self.store.index().owner(bundle_id)
        except ClipbankError:
            owner = None
        if owner is None:
            return f"bundle {bundle_id[:12]}"
        return f"task {shown(owner[0])} version {owner[1].version} (bundle {bundle_id[:12]})"

    def load(
        self,
        previous: BankSnapshot | None = None,
        overrides: Mapping[str, Bundle | None] | None = None,
        changes: int = 0,
    ) -> BankSnapshot:
        """A snapshot of the store's active versions, sharing tensors with `previous` where they are the same.

        `overrides` replaces a task's active version (None: no version) without touching the store, so a
        change can be checked by building the bank it would give before the change is written. A stored task
        that cannot be served (a damaged or missing blob, a bundle this backbone refuses) is left out and
        named in the snapshot's `degraded`, so the rest of the bank serves; an override that fails raises.

        `changes`: how many store changes the caller is about to make (holding the store's lock) to reach that
        state; the snapshot is stamped with the generation the store will then have, so that it can be served
        as it is once the store is there (`adopt`) instead of being built again.
        """
        overrides = overrides or {}
        index = self.store.index()
        tasks, degraded = self._active(index, overrides)
        sources = self.store.expert_sources()
        placed = {eid: (tw, bl) for eid, (tw, bl, _) in previous.expert_ids.items()} if previous else {}
        providers: dict[str, Bundle] = {}
        config = bank_config(previous, tasks.values())
        routed: dict[str, tuple[str, int]] = {}  # where the tasks kept so far route each expert
        for task in sorted(tasks, key=lambda t: t in overrides):  # stored tasks first: a change must fit them
            try:
                mine = self.providers([tasks[task]], sources)
                available = {e: (p.tower, p.block) for b in (tasks[task], *mine) for e, p in b.experts.items()}
                check_compatible(tasks[task], self.backbone, {**placed, **available}, config)
                places = routed_places([tasks[task]], routed)
            except ClipbankError as e:
                if task in overrides:
                    raise
                degraded[task] = _why(e)
                del tasks[task]
                continue
            routed.update(places)
            providers.update({b.id: b for b in mine})
        generation = index.generation + changes
        bank = build_bank(self.backbone, list(tasks.values()), list(providers.values()), generation, previous, degraded)
        if not overrides:
            self.adopt(bank)
        return bank

    def _active(
        self, index: StoreIndex, overrides: Mapping[str, Bundle | None]
    ) -> tuple[dict[str, Bundle], dict[str, str]]:
        """({task: bundle} of the index's active versions with `overrides` applied, {task: why} of those unreadable)."""
        degraded: dict[str, str] = {}
        tasks: dict[str, Bundle] = {}
        for task, entry in index.tasks.items():
            bundle_id = entry.active
            if bundle_id and task not in overrides:
                try:
                    tasks[task] = self.bundle(bundle_id)
                except ClipbankError as e:
                    degraded[task] = _why(e)
        tasks.update({t: b for t, b in overrides.items() if b is not None})
        return tasks, degraded

    def shadows(self, index: StoreIndex) -> tuple[ShadowEntry, ...]:
        """The index's versions in shadow, by task name. One that cannot be read or does not fit the backbone is
        left out (logged once; `shadow_failure` says why), and read again at the store's next generation: a shadow
        never stops what is served."""
        out, failures = [], {}
        for task, bundle_id in sorted(index.shadows().items()):
            entry = self._shadows.get(bundle_id)
            failed = self._shadow_failures.get(bundle_id)
            if entry is None and failed is not None and failed[1] == index.generation:
                failures[bundle_id] = failed
                continue
            if entry is None:
                try:
                    bundle = self.bundle(bundle_id)
                    check_backbone(bundle.manifest.backbone, self.backbone)
                    entry = shadow_entry(bundle, self.backbone.device)
                except Exception as e:  # a damaged blob, I/O, memory: only this shadow is left out
                    failures[bundle_id] = (_why(e), index.generation)
                    if failed is None or failed[0] != failures[bundle_id][0]:
                        log.error("task %s: its version in shadow is left out: %s", task, failures[bundle_id][0])
                    continue
            out.append(entry)
        with self._lock:
            self._shadows, self._shadow_failures = {e.bundle_id: e for e in out}, failures
        return tuple(out)

    def retry_shadows(self) -> None:
        """Read the versions in shadow left out again at the next `shadows`, whatever the generation."""
        with self._lock:
            self._shadow_failures = {b: (why, -1) for b, (why, _) in self._shadow_failures.items()}

    def shadow_failure(self, bundle_id: str) -> str | None:
        """Why the version in shadow `bundle_id` is not scored (None: it is, or it is in no shadow)."""
        failed = self._shadow_failures.get(bundle_id)
        return failed[0] if failed is not None else None

    def adopt(self, bank: BankSnapshot) -> None:
        """`bank` is now the one served: `trim` keeps the bundles it was built from (a checked bank built with
        overrides is adopted once the store has been changed to match it)."""
        with self._lock:
            self._in_use = set(bank.bundle_ids)

    def trim(self) -> int:
        """Forget cached bundles the bank last loaded or adopted does not use (they are re-read if needed); returns
        how many."""
        with self._lock:
            unused = set(self._bundles) - self._in_use
            for bid in unused:
                del self._bundles[bid]
        return len(unused)


def _with_context(error: ClipbankError, context: str) -> ClipbankError:
    """The same error, its message after `context`; the error itself if its class takes no message alone."""
    try:
        return type(error)(f"{context}: {error}")
    except TypeError:
        return error


WHY_CHARS = 600  # a reason kept whole up to this; beyond, its middle is cut (its end is often the remedy)


def _why(error: Exception) -> str:
    text = str(error)
    if len(text) > WHY_CHARS:
        text = f"{text[: WHY_CHARS // 2 - 2]} … {text[-(WHY_CHARS // 2 - 2) :]}"
    return f"{error.code}: {text}" if isinstance(error, ClipbankError) else text

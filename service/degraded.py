"""When a server tries its degraded tasks again, and what it logs about them.

A task left out of the bank because its blob was missing, unreadable or damaged serves again once the blob is
put back, but only a rebuild of the bank finds that: polls rebuild on a new generation alone. So a registry
asks `due()` at each poll. Reasons no retry can heal (another backbone's bundle, a manifest this release
refuses) are not retried; the others are, after 30 s, then at doubling intervals up to 10 minutes while the same
tasks stay degraded for the same reasons. Each reason is logged when it appears or changes, not at every build.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from model_store.errors import BundleNotFound, StoreDamaged, StoreError, StoreUnavailable

log = logging.getLogger("clipbank.service")

FIRST_RETRY_SECONDS = 30.0
LAST_RETRY_SECONDS = 600.0
HEALABLE = tuple(f"{e.code}:" for e in (BundleNotFound, StoreError, StoreDamaged))  # a blob put back heals these
TRANSIENT = f"{StoreUnavailable.code}:"  # an object store's 503 while a blob was read: tried at every poll


class DegradedRetry:
    def __init__(self) -> None:
        self.every = FIRST_RETRY_SECONDS
        self.next_at = time.monotonic() + FIRST_RETRY_SECONDS
        self.known: Mapping[str, str] = {}  # the degraded tasks and reasons last logged

    def due(self, degraded: Mapping[str, str]) -> bool:
        """Whether to rebuild now for `degraded`; when so, the next retry is scheduled before this one runs (a
        rebuild that fails is not tried again at every poll)."""
        reasons = degraded.values()
        if any(why.startswith(TRANSIENT) for why in reasons):
            return True
        if not any(why.startswith(HEALABLE) for why in reasons) or time.monotonic() < self.next_at:
            return False
        self.every = min(self.every * 2, LAST_RETRY_SECONDS)
        self.next_at = time.monotonic() + self.every
        return True

    def now(self) -> None:
        """Retry at the next `due` (an upload of the very bytes of a degraded version)."""
        self.next_at = 0.0

    def swapped(self, degraded: Mapping[str, str]) -> None:
        """A bank was swapped in: log what newly went degraded (or why changed), and start the intervals again
        when the degraded tasks changed."""
        for task, why in degraded.items():
            if self.known.get(task) != why:
                log.error("task %s is degraded (not served): %s", task, why)
        for task in set(self.known) - set(degraded):
            log.warning("task %s serves again", task)
        if dict(degraded) != dict(self.known):
            self.every = FIRST_RETRY_SECONDS
            self.next_at = time.monotonic() + FIRST_RETRY_SECONDS
        self.known = dict(degraded)

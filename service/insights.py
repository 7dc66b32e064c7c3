"""The unclaimed-traffic monitor (issue 15): the frozen embeddings of images no task claimed in auto mode, kept in a
bounded reservoir, and clustered on demand so an operator sees a new domain arriving ("train a task for it").

The reservoir is preallocated when the server starts (a ring of `capacity` embeddings and one of traffic bins), so
its memory never grows with traffic. Clustering (`service.clusters`) works on a copy (`snapshot`), outside the
lock.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import numpy as np

MAX_BINS = 10_000  # hard cap on traffic bins, whatever retention / bin_seconds asks for
THUMBNAIL_SIDES = (16, 128)  # pixels a side of an opt-in thumbnail (0: none kept)
MAX_THUMBNAIL_BYTES = 256 << 20  # capacity x side^2 x 3 bytes of thumbnails, at most


@dataclass(frozen=True)
class ReservoirConfig:
    """How much unclaimed traffic the monitor remembers."""

    capacity: int = 2048  # embeddings kept; 0 = monitor off
    retention_seconds: float = 86400.0  # older entries are dropped
    bin_seconds: float = 60.0  # time resolution of "share of traffic over time"
    thumbnail: int = 0  # opt-in: pixels a side of a thumbnail kept with each embedding (0: embeddings only)

    def __post_init__(self) -> None:
        problems = []
        lo, hi = THUMBNAIL_SIDES
        if self.thumbnail != 0 and not lo <= self.thumbnail <= hi:
            problems.append(f"thumbnail must be 0 (none) or {lo}..{hi} pixels a side, got {self.thumbnail}")
        elif self.capacity * self.thumbnail**2 * 3 > MAX_THUMBNAIL_BYTES:
            problems.append(
                f"capacity x thumbnail^2 x 3 = {self.capacity * self.thumbnail**2 * 3} bytes of thumbnails; at most"
                f" {MAX_THUMBNAIL_BYTES} (fewer or smaller thumbnails)"
            )
        if self.capacity < 0:
            problems.append(f"capacity must be >= 0, got {self.capacity}")
        if not self.retention_seconds > 0:
            problems.append(f"retention_seconds must be > 0, got {self.retention_seconds}")
        if not self.bin_seconds > 0:
            problems.append(f"bin_seconds must be > 0, got {self.bin_seconds}")
        elif self.retention_seconds / self.bin_seconds > MAX_BINS - 1:  # the window would be cut, silently
            problems.append(
                f"retention_seconds / bin_seconds must be at most {MAX_BINS - 1} (bins kept), got "
                f"{self.retention_seconds:g} / {self.bin_seconds:g}: raise bin_seconds or lower the retention"
            )
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def max_bins(self) -> int:
        """Traffic bins kept: enough to cover the retention, never more than MAX_BINS (none when off)."""
        if self.capacity == 0:
            return 0
        return min(MAX_BINS, math.ceil(self.retention_seconds / self.bin_seconds) + 1)


@dataclass(frozen=True)
class TrafficBin:
    """Auto-routed images, and those of them no task claimed, in [start, start + bin_seconds)."""

    start: float
    auto_images: int
    unclaimed: int


@dataclass(frozen=True)
class ReservoirSnapshot:
    """A copy of the reservoir: embeddings [n, dim] and their times [n], oldest first, and the traffic bins of the
    window they cover. Every embedding falls in one of `bins`."""

    embeddings: np.ndarray
    times: np.ndarray
    bins: list[TrafficBin]
    bin_seconds: float = 60.0
    slots: np.ndarray | None = None  # each embedding's slot in the reservoir, and the write that filled it:
    stamps: np.ndarray | None = None  # what `UnclaimedReservoir.thumbnails` takes to find its thumbnail again
    start: float | None = None  # when the traffic the bins count begins (None: no bins)
    moved: np.ndarray | None = None  # each embedding's: a selector claimed it, its request's labels sent it away

    def __len__(self) -> int:
        return len(self.times)

    @property
    def auto_images(self) -> int:
        return sum(b.auto_images for b in self.bins)

    @property
    def unclaimed(self) -> int:
        return sum(b.unclaimed for b in self.bins)


class UnclaimedReservoir:
    """Thread-safe. Memory is preallocated and bounded: capacity x dim float32 + capacity timestamps + a ring of
    at most `config.max_bins` traffic bins, plus capacity RGB thumbnails when `config.thumbnail` opts in. A
    thumbnail lives exactly as long as its embedding: its pixels are wiped when it expires."""

    def __init__(self, config: ReservoirConfig, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.config, self.dim = config, dim
        cap, nb = config.capacity, config.max_bins
        self._emb = np.zeros((cap, dim), np.float32)
        side = config.thumbnail
        self._thumbs = np.zeros((cap if side else 0, side, side, 3), np.uint8)
        self._stamps = np.zeros(cap, np.int64)  # per slot: the record() call that last wrote it
        self._batch = np.zeros((cap, 2), np.int64)  # per slot: its record's auto images and unclaimed ones
        self._before = np.zeros((cap, 2), np.int64)  # and what its bin had counted before that record
        self._moved = np.zeros(cap, bool)  # per slot: claimed by a selector, sent to zero-shot by label-aware routing
        self._writes = 0
        self._times = np.full(cap, -np.inf)  # -inf: empty or expired slot
        self._next = 0  # the slot the next embedding goes to
        self._bin_ids = np.zeros(nb, np.int64)  # floor(time / bin_seconds)
        self._bin_counts = np.zeros((nb, 2), np.int64)  # auto images, unclaimed
        self._bin_last, self._bins = -1, 0  # slot of the newest bin, bins held
        self._latest = -np.inf  # newest time recorded: time never runs backwards in here
        self._lost = -np.inf  # newest time of an unclaimed embedding the ring overwrote (or a batch could not hold)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.config.capacity > 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (fixed at construction)."""
        buffers = (self._emb, self._times, self._bin_ids, self._bin_counts, self._thumbs, self._stamps, self._batch)
        buffers += (self._before, self._moved)
        return sum(b.nbytes for b in buffers)

    def __len__(self) -> int:
        with self._lock:
            return int(np.count_nonzero(self._times > -np.inf))

    def record(
        self,
        auto_images: int,
        unclaimed: np.ndarray,
        now: float | None = None,
        thumbnails: np.ndarray | None = None,
        moved: np.ndarray | None = None,
    ) -> None:
        """One batch: how many images were routed in auto mode, and the frozen embeddings [k, dim] of those of them
        that went to zero-shot (k may be 0), with their thumbnails [k, side, side, 3] uint8 when the reservoir
        keeps them (else ignored; blank when missing), and `moved` [k]: which of them a task's selector claimed
        but their request's labels sent to zero-shot (label-aware routing; None: none). A record older than the
        newest one counts as the newest."""
        if not self.enabled:
            return
        rows = np.asarray(unclaimed, dtype=np.float32)
        rows = rows.reshape(0, self.dim) if rows.size == 0 else rows
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"unclaimed embeddings must be [k, {self.dim}], got {list(rows.shape)}")
        if len(rows) > auto_images:
            raise ValueError(f"{len(rows)} unclaimed embeddings but only {auto_images} auto-routed images")
        side = self.config.thumbnail
        if side and thumbnails is not None and np.shape(thumbnails) != (len(rows), side, side, 3):
            raise ValueError(f"thumbnails must be [{len(rows)}, {side}, {side}, 3], got {list(np.shape(thumbnails))}")
        moved = np.zeros(len(rows), bool) if moved is None else np.asarray(moved, bool).reshape(-1)
        if len(moved) != len(rows):
            raise ValueError(f"moved must have one flag per unclaimed embedding ({len(rows)}), got {len(moved)}")
        if auto_images == 0:
            return
        usable = np.isfinite(rows).all(axis=1) & (np.abs(rows).max(axis=1, initial=0.0) > 0)
        if not usable.all():  # no working pass makes these, and one would break every clustering: auto images only
            rows, moved = rows[usable], moved[usable]
            thumbnails = thumbnails[usable] if side and thumbnails is not None else thumbnails
        now = time.time() if now is None else float(now)
        with self._lock:
            now = self._latest = max(now, self._latest)
            before = self._count(now, auto_images, len(rows))
            keep = rows[-self.config.capacity :]
            slots = (self._next + np.arange(len(keep))) % self.config.capacity
            overwritten = self._times[slots].max(initial=-np.inf)
            self._lost = max(self._lost, now if len(keep) < len(rows) else overwritten)
            self._emb[slots], self._times[slots], self._moved[slots] = keep, now, moved[-self.config.capacity :]
            self._writes += 1
            self._stamps[slots] = self._writes
            self._batch[slots], self._before[slots] = (auto_images, len(rows)), before
            if side:
                self._thumbs[slots] = 0 if thumbnails is None else thumbnails[-self.config.capacity :]
            self._next = (self._next + len(keep)) % self.config.capacity
            self._expire(now)

    def _count(self, now: float, auto_images: int, unclaimed: int) -> np.ndarray:
        """Count a record in its bin; returns what the bin had counted before it."""
        b = math.floor(now / self.config.bin_seconds)
        if self._bins == 0 or b > self._bin_ids[self._bin_last]:
            self._bin_last = (self._bin_last + 1) % len(self._bin_ids)
            self._bin_ids[self._bin_last] = b
            self._bin_counts[self._bin_last] = 0
            self._bins = min(self._bins + 1, len(self._bin_ids))
        before = self._bin_counts[self._bin_last].copy()
        self._bin_counts[self._bin_last] += (auto_images, unclaimed)
        return before

    def expire(self, now: float | None = None) -> None:
        """Drop what the retention has passed now (also done by every record and snapshot): the server calls it
        on a timer, so that thumbnails are wiped on time on a server no auto traffic reaches."""
        if self.enabled:
            with self._lock:
                self._expire(max(time.time() if now is None else float(now), self._latest))

    def thumbnails(self, slots: np.ndarray, stamps: np.ndarray) -> list[np.ndarray | None]:
        """Copies of the thumbnails of a snapshot's `slots` (its `slots[rows]`, `stamps[rows]`), each None when
        its slot was written again or expired since, or when no thumbnails are kept. Copies only these, under the
        lock, so a request for examples holds up the compute thread's `record` for microseconds."""
        if not len(self._thumbs):
            return [None] * len(slots)
        with self._lock:
            live = (self._stamps[slots] == stamps) & (self._times[slots] > -np.inf)
            return [self._thumbs[s].copy() if ok else None for s, ok in zip(slots, live, strict=True)]

    def _expire(self, now: float) -> None:
        """Drop embeddings and bins that ended more than retention_seconds ago."""
        cutoff = now - self.config.retention_seconds
        old = self._times < cutoff
        if len(self._thumbs):  # a user's image is not kept past its retention
            self._thumbs[old & (self._times > -np.inf)] = 0
        self._times[old] = -np.inf
        while self._bins and (self._bin_ids[self._oldest_bin()] + 1) * self.config.bin_seconds <= cutoff:
            self._bins -= 1

    def _oldest_bin(self) -> int:
        return (self._bin_last - self._bins + 1) % len(self._bin_ids)

    def snapshot(self, now: float | None = None) -> ReservoirSnapshot:
        """A copy of what is kept at `now`, oldest first: the embeddings, their times, and the bins of the window
        they cover: the whole retention, or, once the ring has overwritten unclaimed embeddings still within it,
        from the record of the oldest kept embedding (so that shares are of traffic whose unclaimed images are all
        kept: the first bin counts only that record, prorated to what is kept of it, and the records after it)."""
        bs = self.config.bin_seconds
        if not self.enabled:
            return ReservoirSnapshot(np.zeros((0, self.dim), np.float32), np.zeros(0), [], bs, moved=np.zeros(0, bool))
        now = time.time() if now is None else float(now)
        with self._lock:
            now = max(now, self._latest)
            self._expire(now)
            cutoff, overwrote = now - self.config.retention_seconds, self._lost >= now - self.config.retention_seconds
            order = (self._next + np.arange(self.config.capacity)) % self.config.capacity
            order = order[self._times[order] > -np.inf]
            emb, times, stamps = self._emb[order], self._times[order], self._stamps[order]  # fancy indexing copies
            batch, before, moved = self._batch[order], self._before[order], self._moved[order]
            slots = (self._oldest_bin() + np.arange(self._bins)) % len(self._bin_ids)
            ids, counts = self._bin_ids[slots].copy(), self._bin_counts[slots].copy()
        if len(ids):  # embeddings older than the oldest bin (only when MAX_BINS cut the retention) are left out
            keep = times >= ids[0] * bs
            emb, times, order, stamps = emb[keep], times[keep], order[keep], stamps[keep]
            batch, before, moved = batch[keep], before[keep], moved[keep]
        start = times[0] if len(times) and overwrote else cutoff
        first = np.searchsorted(ids, math.floor(start / bs))  # the bin `start` was counted in (or the next one)
        if len(times) and overwrote and first < len(ids):  # from the oldest kept record, less what it lost
            kept = int(np.count_nonzero(stamps == stamps[0]))
            (auto, unclaimed), (auto_before, unclaimed_before) = batch[0], before[0]
            counts[first] -= (auto_before + auto - round(auto * kept / unclaimed), unclaimed_before + unclaimed - kept)
        elif first < len(ids) and ids[first] * bs < cutoff:  # the oldest bin began before the retention: only
            # the part of it whose unclaimed images are kept (an outside check's share read half its value for up to
            # a bin after another domain's images expired), its auto images prorated as when the ring overwrote
            auto, unclaimed = (int(c) for c in counts[first])
            kept = int(np.count_nonzero(np.floor(times / bs) == ids[first]))
            if unclaimed > kept:
                counts[first] = (round(auto * kept / unclaimed), kept)
        bins = [
            TrafficBin(float(i * bs), int(a), int(u)) for i, (a, u) in zip(ids[first:], counts[first:], strict=True)
        ]
        begins = (float(times[0]) if len(times) and overwrote else bins[0].start) if bins else None
        return ReservoirSnapshot(emb, times, bins, bs, order, stamps, begins, moved)

"""Dynamic batching: requests from the event loop are gathered into batches and run on one compute thread."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from model_store.bank import BankSnapshot
from model_store.inference import ClassifyItem, ImageResult, TextCache

from .errors import LimitExceeded, NotReady, Overloaded
from .metrics import Metrics
from .steps import BatchInfo, Pending, StepBudget, Steps, answer

if TYPE_CHECKING:
    from .watch import TrafficWatch

log = logging.getLogger("clipbank.service")
_STOP = object()
T = TypeVar("T")


@dataclass
class _Job:
    """Torch work other than a batch (loading, warm-up, an upload's trial run, the gate), run by the compute
    thread between batches, so that one thread runs all of the process's torch work (see `Batcher.run`)."""

    fn: Callable[..., Any]
    args: tuple
    future: Future = field(default_factory=Future)

    def __call__(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            self.future.set_result(self.fn(*self.args))
        except BaseException as e:  # handed to the caller, whatever it is
            self.future.set_exception(e)


class Batcher:
    """Drains the queue into batches of at most `max_batch` images, waiting at most `max_wait_ms` for company.

    Requests never split. Small requests go first (`_pick`), so clients sending a few images are not held up by
    clients sending many; and a large batch's image passes, like large new label sets, run in short steps
    between batches (`service.steps`). Each batch reads the current bank once and finishes on it, whatever swaps
    happen meanwhile.
    """

    def __init__(
        self,
        bank: Callable[[], BankSnapshot],
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        cache: TextCache | None = None,
        metrics: Metrics | None = None,
        max_queue_images: int = 1024,
        budget: StepBudget | None = None,
        starve_seconds: float = 1.0,
        watch: TrafficWatch | None = None,
    ) -> None:
        self._bank = bank
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.cache = cache if cache is not None else TextCache()
        self.metrics = metrics or Metrics()
        self.max_queue_images = max_queue_images
        self.steps = Steps(budget or StepBudget(), self.cache, self.metrics, watch)
        self._queued = 0  # images admitted and not yet answered (counted on the event loop)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._waiting: list[Pending] = []  # received, not yet in a batch (in arrival order)
        self._stopping = False
        self._closed = False
        self._forced_last = False
        self.starve_seconds = starve_seconds
        self._gap = float("inf")  # seconds between arrivals, moving average
        self._last_arrival: float | None = None
        self.batches = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="clipbank-compute", daemon=True)
        self._thread.start()

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the compute thread, between batches; the caller (any other thread) waits for it.

        The server's model work (start-up, trial runs, the gate) goes through here or runs in a batch: GNU OpenMP
        stops its workers spinning between parallel regions once more threads have run OpenMP work than there are
        cores, and then every small region of a pass waits for its workers to wake (docs/benchmarks/serve.md,
        tiny). Reading bundles and building banks (tensor copies) still run in their callers' threads. Runs
        inline when called on the compute thread, or when it is not running (tests, shutdown)."""
        thread = self._thread
        if thread is None or not thread.is_alive() or threading.current_thread() is thread:
            return fn(*args)
        job = _Job(fn, args)
        self._queue.put(job)
        while True:
            try:
                return job.future.result(timeout=1.0)
            except TimeoutError:
                if not thread.is_alive() and job.future.cancel():  # it ended without taking the job: run it here
                    return fn(*args)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then end the compute thread; requests submitted from now on get 503."""
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None
        while True:  # anything queued after the thread's last look
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Job):
                item()  # here, as the compute thread has ended
            elif item is not _STOP:
                answer(item, NotReady("the server is shutting down"))

    @contextmanager
    def admit(self, n_images: int) -> Iterator[None]:
        """Hold room for `n_images` until the block ends, or refuse at once (503 `overloaded`).

        The server takes it before decoding a request's images, so an overloaded server does no decoding work.
        """
        if self._queued + n_images > self.max_queue_images:
            raise Overloaded(
                f"{self._queued} images are accepted and not yet answered; max_queue_images={self.max_queue_images}: "
                "retry shortly"
            )
        self._queued += n_images
        self.metrics.admitted_images.set(self._queued)
        try:
            yield
        finally:
            self._queued -= n_images
            self.metrics.admitted_images.set(self._queued)

    async def submit(self, item: ClassifyItem, admitted: bool = False) -> tuple[list[ImageResult], BatchInfo]:
        """Queue a request and wait for its answer. `admitted`: the caller holds `admit(len(item.images))`."""
        if self._closed or self._thread is None or not self._thread.is_alive():
            raise NotReady("the server is shutting down" if self._closed else "the compute thread is not running")
        if len(item.images) > self.max_batch:
            raise LimitExceeded(
                f"{len(item.images)} images in one request; this server's max_batch is {self.max_batch}",
                "max_batch",
                self.max_batch,
            )
        if not admitted:
            with self.admit(len(item.images)):
                return await self.submit(item, admitted=True)
        loop = asyncio.get_running_loop()
        pending = Pending(item, loop.create_future(), loop)
        self.metrics.queue_images.inc(pending.size)
        self._queue.put(pending)
        return await pending.future

    # ------------------------------------------------------------------------------ the compute thread

    def _receive(self, timeout: float | None) -> bool:
        """Move one queued request (waiting up to `timeout`; None: forever) and whatever else is queued into
        `_waiting`. False if nothing came."""
        try:
            item = self._queue.get() if timeout is None else self._queue.get(timeout=timeout)
        except queue.Empty:
            return False
        while True:
            if item is _STOP:
                self._stopping = True
            elif isinstance(item, _Job):
                item()
            else:
                self._arrived(item)
                self._waiting.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return True

    def _next_batch(self, block: bool = True) -> list[Pending] | None:
        """The next batch; [] if nothing is waiting and not `block`; None once stopped and drained."""
        if self._waiting or not block:
            self._receive(0)  # whatever was queued meanwhile
        while not self._waiting:
            if self._stopping:
                return None
            if not block:
                return []
            self._receive(None)
        deadline = time.perf_counter() + self.wait_seconds()
        while sum(p.size for p in self._waiting if not p.future.done()) < self.max_batch and not self._stopping:
            timeout = deadline - time.perf_counter()
            if timeout <= 0 or not self._receive(timeout):
                break
        return self._pick()

    def _pick(self) -> list[Pending]:
        """Small requests first, so a request of a few images never waits behind requests of many; a request
        waiting longer than `starve_seconds` goes first, but never in two batches in a row."""
        if gone := [p for p in self._waiting if p.future.done()]:  # their clients went away: no room in a batch
            self._waiting = [p for p in self._waiting if not p.future.done()]
            self.metrics.queue_images.dec(sum(p.size for p in gone))
            self.metrics.abandoned.labels("queued").inc(len(gone))
        waiting = self._waiting
        if not waiting:
            return []
        oldest = waiting[0]  # FIFO: the first one waited longest
        forced = time.perf_counter() - oldest.enqueued > self.starve_seconds and not self._forced_last
        by_size = sorted(waiting[1:] if forced else waiting, key=lambda p: (p.size, p.enqueued))
        batch, n = [], 0
        for p in ([oldest] if forced else []) + by_size:
            if n + p.size <= self.max_batch:
                batch.append(p)
                n += p.size
        self._forced_last = forced
        chosen = {id(p) for p in batch}
        self._waiting = [p for p in waiting if id(p) not in chosen]
        return batch

    def wait_seconds(self) -> float:
        """How long the first request of a batch waits for company: `max_wait` while requests arrive closer
        together than that (bursts of concurrent clients fill the batch), else 0 (a lone client or a slow
        trickle would only be delayed)."""
        return self.max_wait if self._gap < self.max_wait else 0.0

    def _arrived(self, p: Pending) -> None:
        """Moving average of the gaps between request arrivals (FIFO, so enqueue times are in order)."""
        if self._last_arrival is not None:
            # capped, so one idle spell does not stop the next burst from being batched
            gap = min(max(p.enqueued - self._last_arrival, 0.0), 2 * self.max_wait)
            self._gap = gap if self._gap == float("inf") else 0.8 * self._gap + 0.2 * gap
        self._last_arrival = p.enqueued

    def _run(self) -> None:
        while True:
            batch = self._next_batch(block=not self.steps)  # work in steps: do not sleep on the queue
            if batch is None:
                while self.steps:  # stopping: finish what was accepted
                    self.steps.step()
                return
            if batch:
                self.metrics.queue_images.dec(sum(p.size for p in batch))
                batch = [p for p in batch if not p.future.done()]  # the client went away
                if batch:
                    self.batches += 1
                    try:
                        self.steps.start(self._bank(), batch)  # each batch reads the bank once
                    except Exception as e:  # the thread must outlive any one batch
                        log.exception("a batch failed to start")
                        for p in batch:
                            answer(p, e)
            if self.steps:
                self.steps.step()

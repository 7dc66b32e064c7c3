"""Dynamic batching: requests from the event loop are gathered into batches and run on one compute thread."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from model_store.bank import BankSnapshot
from model_store.inference import AUTO, ClassifyItem, ImageResult, TextCache, classify_batch

from .errors import Overloaded
from .metrics import Metrics

log = logging.getLogger("clipbank.service")


@dataclass(frozen=True)
class BatchInfo:
    """How a request was served: for the response's `timing` and for tests."""

    queue_ms: float
    compute_ms: float
    batch_images: int
    batch_requests: int
    generation: int


@dataclass
class _Pending:
    item: ClassifyItem
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return len(self.item.images)


_STOP = object()


class Batcher:
    """Drains the queue into batches of at most `max_batch` images, waiting at most `max_wait_ms` for company.

    Each batch reads the current bank once and finishes on it, whatever swaps happen meanwhile.
    """

    def __init__(
        self,
        bank: Callable[[], BankSnapshot],
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        cache: TextCache | None = None,
        metrics: Metrics | None = None,
        max_queue_images: int = 1024,
    ) -> None:
        self._bank = bank
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.cache = cache if cache is not None else TextCache()
        self.metrics = metrics or Metrics()
        self.max_queue_images = max_queue_images
        self._queued = 0  # images submitted and not yet answered (counted on the event loop)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._carry: _Pending | None = None
        self._gap = float("inf")  # seconds between arrivals, moving average
        self._last_arrival: float | None = None
        self.batches = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="clipbank-compute", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then end the compute thread."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    async def submit(self, item: ClassifyItem) -> tuple[list[ImageResult], BatchInfo]:
        if self._thread is None:
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        pending = _Pending(item, loop.create_future(), loop)
        if self._queued + pending.size > self.max_queue_images:
            raise Overloaded(
                f"{self._queued} images are waiting; max_queue_images={self.max_queue_images}: retry shortly"
            )
        self._queued += pending.size
        self.metrics.queue_images.inc(pending.size)
        self._queue.put(pending)
        try:
            return await pending.future
        finally:
            self._queued -= pending.size

    # ------------------------------------------------------------------------------ the compute thread

    def _next_batch(self) -> list[_Pending] | None:
        first = self._carry if self._carry is not None else self._queue.get()
        self._carry = None
        if first is _STOP:
            return None
        batch, n = [first], first.size
        self._arrived(first)
        deadline = time.perf_counter() + self.wait_seconds()
        while n < self.max_batch:
            try:
                nxt = self._queue.get_nowait()  # whatever queued while the last batch ran joins at once
            except queue.Empty:
                timeout = deadline - time.perf_counter()
                if timeout <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=timeout)
                except queue.Empty:
                    break
            if nxt is _STOP or n + nxt.size > self.max_batch:
                self._carry = nxt
                break
            batch.append(nxt)
            n += nxt.size
            self._arrived(nxt)
        return batch

    def wait_seconds(self) -> float:
        """How long the first request of a batch waits for company: `max_wait` while requests arrive closer
        together than that (bursts of concurrent clients fill the batch), else 0 (a lone client or a slow
        trickle would only be delayed)."""
        return self.max_wait if self._gap < self.max_wait else 0.0

    def _arrived(self, p: _Pending) -> None:
        """Moving average of the gaps between request arrivals (FIFO, so enqueue times are in order)."""
        if self._last_arrival is not None:
            # capped, so one idle spell does not stop the next burst from being batched
            gap = min(max(p.enqueued - self._last_arrival, 0.0), 2 * self.max_wait)
            self._gap = gap if self._gap == float("inf") else 0.8 * self._gap + 0.2 * gap
        self._last_arrival = p.enqueued

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self.metrics.queue_images.dec(sum(p.size for p in batch))
            batch = [p for p in batch if not p.future.done()]  # the client went away
            if batch:
                self._compute(batch)

    def _compute(self, batch: list[_Pending]) -> None:
        bank = self._bank()
        started = time.perf_counter()
        try:
            outs: list = classify_batch(bank, [p.item for p in batch], self.cache)
        except Exception as e:  # noqa: BLE001 - a bug must not kill the thread; every waiter gets the error
            log.exception("batch of %d requests failed", len(batch))
            outs = [e] * len(batch)
        done = time.perf_counter()
        n_images = sum(p.size for p in batch)
        self.batches += 1
        self.metrics.batch_images.observe(n_images)
        self.metrics.batch_requests.observe(len(batch))
        for p, out in zip(batch, outs):
            if isinstance(out, list):
                self._count_routes(p.item, out)
                info = BatchInfo(
                    (started - p.enqueued) * 1000, (done - started) * 1000, n_images, len(batch), bank.generation
                )
                out = (out, info)
            try:
                p.loop.call_soon_threadsafe(_settle, p.future, out)
            except RuntimeError:  # the event loop has closed: nobody is waiting any more
                pass

    def _count_routes(self, item: ClassifyItem, results: list[ImageResult]) -> None:
        for r in results:
            self.metrics.routes.labels(task=r.route.task or "zero-shot").inc()
            if item.task == AUTO:
                self.metrics.auto_images.inc()
                if r.route.task is None:
                    self.metrics.fallback.inc()


def _settle(future: asyncio.Future, out: object) -> None:
    if future.done():
        return
    if isinstance(out, BaseException):
        future.set_exception(out)
    else:
        future.set_result(out)

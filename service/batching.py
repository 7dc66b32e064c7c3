"""Dynamic batching: requests from the event loop are gathered into batches and run on one compute thread."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from model_store.bank import BankSnapshot
from model_store.inference import AUTO, BatchPlan, ClassifyItem, ImageResult, TextCache, TextJob, plan_batch

from .errors import LimitExceeded, Overloaded
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


@dataclass
class _Parked:
    """A request whose new label sets are being encoded a chunk at a time, between other batches."""

    pending: _Pending
    plan: BatchPlan
    index: int  # the request's place in its plan
    jobs: list[TextJob]
    started: float  # when its batch began


@dataclass(frozen=True)
class TextBudget:
    """How label-set encoding shares the compute thread with image batches.

    A batch encodes up to `inline_chars` characters of new prompts at once; a request that needs more is parked
    and its prompts are encoded about `step_seconds` at a time, one step after each batch, so a long list of new
    labels delays other requests by about one step, not by its whole encoding (open_clip's tokenizer is pure
    Python, so a step also bounds how long the event loop waits for the GIL). A request that would encode more
    than `max_request_prompts` new prompts is refused (413); more than `max_parked_prompts` waiting is 503.
    """

    inline_chars: int = 2048
    step_seconds: float = 0.01
    max_request_prompts: int = 16384
    max_parked_prompts: int = 65536


_STOP = object()


class Batcher:
    """Drains the queue into batches of at most `max_batch` images, waiting at most `max_wait_ms` for company.

    Each batch reads the current bank once and finishes on it, whatever swaps happen meanwhile. Large new label
    sets are encoded in steps between batches (`TextBudget`).
    """

    def __init__(
        self,
        bank: Callable[[], BankSnapshot],
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        cache: TextCache | None = None,
        metrics: Metrics | None = None,
        max_queue_images: int = 1024,
        text: TextBudget | None = None,
    ) -> None:
        self._bank = bank
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.cache = cache if cache is not None else TextCache()
        self.metrics = metrics or Metrics()
        self.max_queue_images = max_queue_images
        self.text = text or TextBudget()
        self._queued = 0  # images admitted and not yet answered (counted on the event loop)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._carry: _Pending | None = None
        self._gap = float("inf")  # seconds between arrivals, moving average
        self._last_arrival: float | None = None
        self._parked: deque[_Parked] = deque()
        self._char_seconds = 5e-5  # moving average of the encoding time per prompt character
        self.batches = 0
        self.text_steps = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="clipbank-compute", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then end the compute thread."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    @contextmanager
    def admit(self, n_images: int) -> Iterator[None]:
        """Hold room for `n_images` until the block ends, or refuse at once (503 `overloaded`).

        The server takes it before decoding a request's images, so an overloaded server does no decoding work.
        """
        if self._queued + n_images > self.max_queue_images:
            raise Overloaded(
                f"{self._queued} images are waiting; max_queue_images={self.max_queue_images}: retry shortly"
            )
        self._queued += n_images
        try:
            yield
        finally:
            self._queued -= n_images

    async def submit(self, item: ClassifyItem, admitted: bool = False) -> tuple[list[ImageResult], BatchInfo]:
        """Queue a request and wait for its answer. `admitted`: the caller holds `admit(len(item.images))`."""
        if self._thread is None:
            raise RuntimeError("the batcher is not running")
        if not admitted:
            with self.admit(len(item.images)):
                return await self.submit(item, admitted=True)
        loop = asyncio.get_running_loop()
        pending = _Pending(item, loop.create_future(), loop)
        self.metrics.queue_images.inc(pending.size)
        self._queue.put(pending)
        return await pending.future

    # ------------------------------------------------------------------------------ the compute thread

    def _take(self, block: bool) -> object | None:
        if self._carry is not None:
            first, self._carry = self._carry, None
            return first
        try:
            return self._queue.get() if block else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _next_batch(self, block: bool = True) -> list[_Pending] | None:
        """The next batch; [] if nothing is queued and not `block`; None once stopped."""
        first = self._take(block)
        if first is None:
            return []
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
            batch = self._next_batch(block=not self._parked)  # parked text work: do not sleep on the queue
            if batch is None:
                while self._parked:  # stopping: finish what was accepted
                    self._step_parked()
                return
            if batch:
                self.metrics.queue_images.dec(sum(p.size for p in batch))
                batch = [p for p in batch if not p.future.done()]  # the client went away
                if batch:
                    self._compute(batch)
            if self._parked:
                self._step_parked()

    def _compute(self, batch: list[_Pending]) -> None:
        bank = self._bank()
        started = time.perf_counter()
        try:
            plan = plan_batch(bank, [p.item for p in batch])
        except Exception as e:  # noqa: BLE001 - a bug must not kill the thread; every waiter gets the error
            log.exception("batch of %d requests failed", len(batch))
            for p in batch:
                _answer(p, e)
            return
        self.batches += 1
        self.metrics.batch_images.observe(sum(p.size for p in batch))
        self.metrics.batch_requests.observe(len(batch))
        inline = self.text.inline_chars
        for k, p in enumerate(batch):
            jobs = [TextJob(bank, *need) for need in plan.text_needs(k)]
            jobs = [j for j in jobs if j.key not in self.cache]
            cost, chars = sum(j.remaining for j in jobs), sum(j.remaining_chars for j in jobs)
            if cost > self.text.max_request_prompts:
                _answer(p, LimitExceeded(_too_many_prompts(cost, self.text.max_request_prompts)))
            elif chars <= inline:
                inline -= chars
                self._finish(_Parked(p, plan, k, jobs, started))
            elif cost + self._parked_prompts() > self.text.max_parked_prompts:
                _answer(p, Overloaded(f"{self._parked_prompts()} new prompts are waiting to be encoded: retry shortly"))
            else:
                self._parked.append(_Parked(p, plan, k, jobs, started))

    def _parked_prompts(self) -> int:
        return sum(j.remaining for w in self._parked for j in w.jobs)

    def _step_parked(self) -> None:
        """Encode about `step_seconds` worth of the oldest parked request's prompts, then let others go first."""
        work = self._parked.popleft()
        job = next(j for j in work.jobs if j.remaining)
        n = min(256, job.fit(int(self.text.step_seconds / self._char_seconds)))
        before = job.remaining_chars
        t0 = time.perf_counter()
        try:
            job.step(n)
        except Exception as e:  # noqa: BLE001 - reported to its request only
            log.exception("encoding labels failed")
            _answer(work.pending, e)
            return
        self.text_steps += 1
        chars = max(before - job.remaining_chars, 1)
        self._char_seconds = 0.8 * self._char_seconds + 0.2 * (time.perf_counter() - t0) / chars
        if any(j.remaining for j in work.jobs):
            self._parked.append(work)
        else:
            self._finish(work)

    def _finish(self, work: _Parked) -> None:
        # a label set another request of the batch has cached meanwhile is not encoded twice
        known = {j.key: j.result() for j in work.jobs if j.remaining == 0 or j.key not in self.cache}
        out = work.plan.finish(work.index, self.cache, known)
        if isinstance(out, list):
            self._count_routes(work.pending.item, out)
            p = work.pending
            info = BatchInfo(
                (work.started - p.enqueued) * 1000,
                (time.perf_counter() - work.started) * 1000,
                sum(len(it.images) for it in work.plan.items),
                len(work.plan.items),
                work.plan.bank.generation,
            )
            out = (out, info)
        _answer(work.pending, out)

    def _count_routes(self, item: ClassifyItem, results: list[ImageResult]) -> None:
        for r in results:
            self.metrics.routes.labels(task=r.route.task or "zero-shot").inc()
            if item.task == AUTO:
                self.metrics.auto_images.inc()
                if r.route.task is None:
                    self.metrics.fallback.inc()


def _too_many_prompts(cost: int, limit: int) -> str:
    return (
        f"this request needs {cost} new text prompts (labels x templates of the tasks its images were routed to); "
        f"the limit is max_request_prompts={limit}: send fewer labels, or label sets the server has seen before"
    )


def _answer(p: _Pending, out: object) -> None:
    try:
        p.loop.call_soon_threadsafe(_settle, p.future, out)
    except RuntimeError:  # the event loop has closed: nobody is waiting any more
        pass


def _settle(future: asyncio.Future, out: object) -> None:
    if future.done():
        return
    if isinstance(out, BaseException):
        future.set_exception(out)
    else:
        future.set_result(out)

"""Work on the compute thread in short steps: the image passes of a large batch and the encoding of new label
sets run a slice at a time, round robin, between batches, so no request holds the thread for long."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from model_store.bank import BankSnapshot
from model_store.errors import ClipbankError
from model_store.inference import AUTO, BatchPlan, ClassifyItem, ImagePasses, ImageResult, TextCache
from model_store.modes import ZERO_SHOT
from model_store.text import TextJob

from .errors import LimitExceeded, Overloaded
from .metrics import Metrics

if TYPE_CHECKING:
    from .watch import TrafficWatch

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
class Pending:
    """A request waiting for the compute thread, with the future its handler awaits."""

    item: ClassifyItem
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return len(self.item.images)


@dataclass(frozen=True)
class StepBudget:
    """How long one step may hold the compute thread, and the bounds on label-set encoding.

    A batch holding a request of more than `slice_over_images` images runs its image passes a slice of about
    `image_step_seconds` at a time; batches of small requests run at once (slicing them would only delay them,
    and cost a slow backbone its batching efficiency).
    A batch encodes up to `inline_chars` characters of new prompts at once; a request that needs more is
    parked and its prompts are encoded about `text_step_seconds` at a time (open_clip's tokenizer is pure
    Python, so a step also bounds how long the event loop waits for the GIL). A request that would encode more
    than `max_request_prompts` new prompts is refused (413); more than `max_parked_prompts` waiting is 503.
    """

    image_step_seconds: float = 0.025
    slice_over_images: int = 8
    text_step_seconds: float = 0.01
    inline_chars: int = 2048
    max_request_prompts: int = 16384
    max_parked_prompts: int = 65536


@dataclass
class _ImageWork:
    batch: list[Pending]
    passes: ImagePasses
    started: float


@dataclass
class _TextWork:
    """A request whose new label sets are being encoded a chunk at a time."""

    pending: Pending
    plan: BatchPlan
    index: int  # the request's place in its plan
    jobs: list[TextJob]
    started: float  # when its batch began
    watched: object  # what the watch keeps of the request's image passes until it is answered (or None)


class Steps:
    """The compute thread's work that runs in steps, round robin: `step()` after each batch."""

    def __init__(
        self,
        budget: StepBudget,
        cache: TextCache,
        metrics: Metrics,
        watch: TrafficWatch | None = None,
    ) -> None:
        """`watch` sees the image passes of the requests answered with results (shadow scoring, the unclaimed
        reservoir)."""
        self.budget, self.cache, self.metrics, self.watch = budget, cache, metrics, watch
        self.works: deque[_ImageWork | _TextWork] = deque()
        self._image_seconds = 0.005  # moving averages of one image's pass and one prompt character's encoding
        self._char_seconds = 5e-5
        self.image_steps = self.text_steps = 0

    def __bool__(self) -> bool:
        return bool(self.works)

    def start(self, bank: BankSnapshot, batch: list[Pending]) -> None:
        """Run a batch's image passes now if they fit in one step, else queue them in slices."""
        try:
            work = _ImageWork(batch, ImagePasses(bank, [p.item for p in batch]), time.perf_counter())
        except Exception as e:  # a bug or out of memory must not kill the thread
            _fail(batch, e)
            return
        self.metrics.batch_images.observe(sum(p.size for p in batch))
        self.metrics.batch_requests.observe(len(batch))
        big = max(p.size for p in batch) > self.budget.slice_over_images
        if not big or sum(p.size for p in batch) <= self._images_per_step():
            self._advance(work, 1 << 30)
        else:
            self.works.append(work)

    def step(self) -> None:
        """One step of the oldest work; unfinished work goes to the back. Work whose clients all went away is
        dropped: nobody waits for it, and parked prompts count against `max_parked_prompts`."""
        work = self.works.popleft()
        if _abandoned(work):
            requests = len(work.batch) if isinstance(work, _ImageWork) else 1
            self.metrics.abandoned.labels("in_steps").inc(requests)
            return
        if isinstance(work, _ImageWork):
            self._advance(work, self._images_per_step())
        else:
            self._encode(work)

    def _images_per_step(self) -> int:
        return max(1, int(self.budget.image_step_seconds / self._image_seconds))

    def _advance(self, work: _ImageWork, n: int) -> None:
        t0 = time.perf_counter()
        try:
            done = work.passes.step(n)
            self.image_steps += 1
            while n >= 1 << 30 and not done:
                done = work.passes.step(n)
        except Exception as e:  # a bug must not kill the thread; every waiter gets the error
            _fail(work.batch, e)
            return
        images = len(work.passes.images) if work.passes.images is not None else 0
        seconds = (time.perf_counter() - t0) / max(min(n, images), 1)
        self._image_seconds = 0.8 * self._image_seconds + 0.2 * seconds
        if done:
            self._passes_done(work)
        else:
            self.works.append(work)

    def _passes_done(self, work: _ImageWork) -> None:
        """Per request: finish it now (its label sets are cached or small), park its encoding, or refuse it.

        The watch sees the requests answered with results, just before their answers (so a client that has its
        answer sees its images counted), and never a refused one's: its client may well send the images again."""
        plan, inline = work.passes.plan(), self.budget.inline_chars
        answers: dict[int, object] = {}
        for k, p in enumerate(work.batch):
            try:
                out, inline = self._after_passes(work, plan, k, p, inline)
            except Exception as e:  # one request's failure is its own
                log.error("a request failed on the compute thread", exc_info=e)
                out = e
            if out is not None:
                answers[k] = out
        self._watch(work.passes, [k for k, out in answers.items() if not isinstance(out, BaseException)])
        for k, out in answers.items():
            answer(work.batch[k], out)

    def _after_passes(self, work: _ImageWork, plan: BatchPlan, k: int, p: Pending, inline: int) -> tuple[object, int]:
        """Request `k`'s answer (None if parked), and the inline budget left."""
        jobs = [j for j in (TextJob(plan.bank, *need) for need in plan.text_needs(k)) if j.key not in self.cache]
        cost, chars = sum(j.remaining for j in jobs), sum(j.remaining_chars for j in jobs)
        live = (w for w in self.works if isinstance(w, _TextWork) and not _abandoned(w))
        parked = sum(j.remaining for w in live for j in w.jobs)
        if cost > self.budget.max_request_prompts:
            limit = self.budget.max_request_prompts
            return LimitExceeded(_too_many_prompts(cost, limit), "max_request_prompts", limit), inline
        if chars <= inline:
            return self._finish(_TextWork(p, plan, k, jobs, work.started, None)), inline - chars
        if cost + parked > self.budget.max_parked_prompts:
            return Overloaded(f"{parked} new prompts are waiting to be encoded: retry shortly"), inline
        watched = self.watch.keep(work.passes, k) if self.watch is not None else None
        self.works.append(_TextWork(p, plan, k, jobs, work.started, watched))
        return None, inline

    def _watch(self, passes: object, requests: list[int]) -> None:
        if self.watch is not None and requests:
            try:
                self.watch(passes, requests)
            except Exception:  # watching never fails a request
                log.exception("watching a batch failed")

    def _encode(self, work: _TextWork) -> None:
        job = next(j for j in work.jobs if j.remaining)
        n = min(256, job.fit(int(self.budget.text_step_seconds / self._char_seconds)))
        before, t0 = job.remaining_chars, time.perf_counter()
        try:
            job.step(n)
        except Exception as e:  # reported to its request only
            log.exception("encoding labels failed")
            answer(work.pending, e)
            return
        self.text_steps += 1
        chars = max(before - job.remaining_chars, 1)
        self._char_seconds = 0.8 * self._char_seconds + 0.2 * (time.perf_counter() - t0) / chars
        if any(j.remaining for j in work.jobs):
            self.works.append(work)
            return
        out = self._finish(work)
        if work.watched is not None and not isinstance(out, BaseException):
            self._watch(work.watched, [0])
        answer(work.pending, out)

    def _finish(self, work: _TextWork) -> object:
        """The request's answer: its results and how it was served, or its exception."""
        try:
            out = self._answer_finished(work)
        except ClipbankError as e:  # the request's own fault (labels its tokenizer reads as one): its answer
            out = e
        except Exception as e:  # a bug: that request's error, not the thread's
            log.error("a request failed on the compute thread", exc_info=e)
            return e
        if isinstance(out, ClipbankError):  # refused by this bank (a pin to a task it lacks): its generation says so
            out.generation = work.plan.bank.generation  # type: ignore[attr-defined]
        return out

    def _answer_finished(self, work: _TextWork) -> object:
        # a label set another request of the batch has cached meanwhile is not encoded twice
        known = {j.key: j.result() for j in work.jobs if j.remaining == 0 or j.key not in self.cache}
        out = work.plan.finish(work.index, self.cache, known)
        if not isinstance(out, list):
            return out
        self._count_routes(work.pending.item, out)
        p, items = work.pending, work.plan.items
        info = BatchInfo(
            (work.started - p.enqueued) * 1000,
            (time.perf_counter() - work.started) * 1000,
            sum(len(it.images) for it in items),
            len(items),
            work.plan.bank.generation,
        )
        return out, info

    def _count_routes(self, item: ClassifyItem, results: Sequence[ImageResult]) -> None:
        m = self.metrics
        for r in results:
            route = r.route.task or ZERO_SHOT
            m.routes.labels(task=route).inc()
            if item.task == AUTO:
                m.auto_images.inc()
                m.claims.labels(route=route).inc()
                if r.route.score is not None and math.isfinite(r.route.score):  # an inf would poison the sum
                    m.route_score.labels(route=route).observe(r.route.score)
                if r.route.task is None:
                    m.fallback.inc()
                if r.moved_by_labels:
                    m.moved_by_labels.inc()


def _too_many_prompts(cost: int, limit: int) -> str:
    return (
        f"this request needs {cost} new text prompts (labels x templates of the tasks its images were routed to, "
        "and of zero-shot CLIP beside a task that knows only some of the labels); "
        f"the limit is max_request_prompts={limit}: send fewer labels, or label sets the server has seen before"
    )


def _abandoned(work: _ImageWork | _TextWork) -> bool:
    """Whether every request of `work` is settled already: its client went away (its future was cancelled).
    Read from the compute thread, as the batcher reads the queue's futures."""
    batch = work.batch if isinstance(work, _ImageWork) else [work.pending]
    return all(p.future.done() for p in batch)


def _fail(batch: list[Pending], error: Exception) -> None:
    log.error("%d request(s) failed on the compute thread", len(batch), exc_info=error)
    for p in batch:
        answer(p, error)


def answer(p: Pending, out: object) -> None:
    """Settle a request's future from the compute thread."""
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

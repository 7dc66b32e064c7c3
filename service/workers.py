"""Where image decoding runs: light requests in the default thread pool, heavy ones in a few low-priority threads,
and either stops early when its client goes away."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.requests import Request

from .errors import ClientGone

log = logging.getLogger("clipbank.service")
T = TypeVar("T")
# A request whose images decode to more pixels than this is heavy: it runs in the heavy threads, at the lowest
# scheduling priority, so requests built to cost decoding time take what the machine has spare and ordinary ones
# never queue behind them.
HEAVY_DECODE_PIXELS = 4_000_000
HEAVY_NICE = 19
WATCH_SECONDS = 0.25  # how often a waiting request asks whether its client is still there


def _lowest_priority() -> None:
    """Run this thread at nice 19 (Linux schedules threads one by one; elsewhere this would renice the process)."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HEAVY_NICE)
        except OSError as e:
            log.warning("heavy decode threads keep their priority: %s", e)


class DecodeWorkers:
    """The heavy-decode threads: half the cores (at least one), at the lowest priority."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or max(1, (os.cpu_count() or 2) // 2)
        self._heavy = ThreadPoolExecutor(self.threads, "clipbank-heavy-decode", initializer=_lowest_priority)

    async def run(self, request: Request, pixels: int, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args, cancelled)` in a thread; `cancelled()` turns True once the client has disconnected."""
        gone = threading.Event()
        executor = self._heavy if pixels > HEAVY_DECODE_PIXELS else None
        call = functools.partial(contextvars.copy_context().run, fn, *args, gone.is_set)  # its lines name the request
        future = asyncio.get_running_loop().run_in_executor(executor, call)
        while True:
            done, _ = await asyncio.wait({future}, timeout=WATCH_SECONDS)
            if done:
                return future.result()
            if not gone.is_set() and await request.is_disconnected():
                gone.set()

    def shutdown(self) -> None:
        self._heavy.shutdown(wait=False, cancel_futures=True)


async def while_connected(request: Request, awaitable: Awaitable[T], waiting_for: str) -> T:
    """`awaitable`'s result, or ClientGone once the client disconnects first: the wait is cancelled, so a request
    still queued for the compute thread is left out of its batch. An outside check's 16 clients that timed out
    after sending 64 images each held the queue (the next live clients got 503) and were counted as 200s."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=WATCH_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone(f"the client closed the connection while waiting for {waiting_for}")
    finally:
        task.cancel()  # done: nothing; else the queued request's future is cancelled with it

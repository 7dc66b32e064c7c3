"""A bounded load generator for a running server: fixed concurrency, capped in requests and in seconds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np

RequestFactory = Callable[[int], dict[str, Any]]  # i -> httpx request kwargs for POST /classify


@dataclass(frozen=True)
class LoadResult:
    concurrency: int
    requests: int
    errors: int
    images: int
    seconds: float
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    status: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Run:
    """State the simulated clients share (they run on one event loop, so plain fields are safe)."""

    concurrency: int
    limit: int
    max_seconds: float
    go: asyncio.Event = field(default_factory=asyncio.Event)
    warmed: int = 0
    sent: int = 0
    start: float = 0.0
    deadline: float = 0.0


async def _client(url: str, headers: dict | None, make: RequestFactory, run: _Run, out: list) -> None:
    """One simulated client with its own connection (one shared httpx pool stalled requests for seconds at 64)."""
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers) as client:
        try:  # warm-up, not measured: the connection and the server's first-call costs
            await client.post("/classify", **make(0))
        except httpx.HTTPError:
            pass
        run.warmed += 1
        if run.warmed == run.concurrency:  # the last one in starts the clock for all
            run.start = time.perf_counter()
            run.deadline = run.start + run.max_seconds
            run.go.set()
        await run.go.wait()
        while run.sent < run.limit and time.perf_counter() < run.deadline:
            kwargs = make(run.sent)
            run.sent += 1
            n_images = len(kwargs.get("files", ())) or len(kwargs.get("json", {}).get("images", ()))
            start = time.perf_counter()
            try:
                r = await client.post("/classify", **kwargs)
                status = str(r.status_code)
            except httpx.HTTPError as e:
                status = type(e).__name__
            out.append((time.perf_counter() - start, status, n_images))


async def run_load(
    url: str, make: RequestFactory, concurrency: int, requests: int, max_seconds: float, headers: dict | None = None
) -> LoadResult:
    """`concurrency` clients post until `requests` were sent or `max_seconds` passed; latency per request."""
    out: list[tuple[float, str, int]] = []
    run = _Run(concurrency, requests, max_seconds)
    await asyncio.gather(*[_client(url, headers, make, run, out) for _ in range(concurrency)])
    seconds = time.perf_counter() - run.start
    ok = [(lat, n) for lat, status, n in out if status == "200"]
    lat_ms = np.array([lat for lat, _ in ok]) * 1000 if ok else np.array([float("nan")])
    status: dict[str, int] = {}
    for _, s, _ in out:
        status[s] = status.get(s, 0) + 1
    images = sum(n for _, n in ok)
    return LoadResult(
        concurrency,
        len(out),
        len(out) - len(ok),
        images,
        round(seconds, 3),
        round(images / seconds, 2),
        *(round(float(np.percentile(lat_ms, q)), 2) for q in (50, 95, 99)),
        status,
    )

"""A bounded load generator for a running server: fixed concurrency, capped in requests and in seconds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
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


async def _worker(
    client: httpx.AsyncClient, make: RequestFactory, counter: list[int], limit: int, deadline: float, out: list
) -> None:
    while counter[0] < limit and time.perf_counter() < deadline:
        i = counter[0]
        counter[0] += 1
        kwargs = make(i)
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
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as client:
        # Warm-up, not measured: every connection opened, and the server's first-call costs paid.
        await asyncio.gather(*[client.post("/classify", **make(i)) for i in range(concurrency)])
        counter = [0]
        start = time.perf_counter()
        deadline = start + max_seconds
        await asyncio.gather(*[_worker(client, make, counter, requests, deadline, out) for _ in range(concurrency)])
        seconds = time.perf_counter() - start
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

"""Soak traffic: clients that each hold one connection and record every answer's span, status and routes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

# i -> (kind, pinned task or None, httpx kwargs of POST /classify)
RequestPlan = Callable[[int], tuple[str, str | None, dict[str, Any]]]


@dataclass(frozen=True)
class Sample:
    """One request as the client saw it (times are time.monotonic())."""

    start: float
    end: float
    kind: str
    task: str | None  # the task it was pinned to
    status: str  # "200", "404 task_not_found", or a transport error's class name
    routes: tuple[tuple[str, str], ...] = ()  # (task, bundle id) of each image routed to a task

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000


def soak_plan(images: Sequence[bytes], tasks: Sequence[str], labels: Sequence[str]) -> RequestPlan:
    """Even requests are pinned to the tasks in turn (their own classes), odd ones are auto with `labels`, routed
    by the selectors alone (`match_labels=false`: the labels are no task's, so they would route nothing)."""

    def plan(i: int) -> tuple[str, str | None, dict[str, Any]]:
        files = [("images", ("x.png", images[i % len(images)]))]
        if i % 2 == 0 and tasks:
            task = tasks[(i // 2) % len(tasks)]
            return "pinned", task, {"files": files, "data": {"task": task}}
        return "auto", None, {"files": files, "data": {"labels": list(labels), "match_labels": "false"}}

    return plan


def status_of(response: httpx.Response) -> str:
    if response.status_code == 200:
        return "200"
    try:
        return f"{response.status_code} {response.json()['error']['code']}"
    except (ValueError, KeyError, TypeError):
        return str(response.status_code)


def _routes(response: httpx.Response) -> tuple[tuple[str, str], ...]:
    results = response.json()["results"]
    return tuple((r["route"]["task"], r["route"]["bundle_id"]) for r in results if r["route"]["task"] is not None)


async def _client(
    url: str, plan: RequestPlan, first: int, step: int, until: float, out: list[Sample], stop: threading.Event
) -> None:
    """One client with its own connection, posting back to back until `until` (time.monotonic()) or `stop`."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        i = first
        while time.monotonic() < until and not stop.is_set():
            kind, task, kwargs = plan(i)
            i += step
            start = time.monotonic()
            try:
                r = await http.post("/classify", **kwargs)
                status, routes = status_of(r), (_routes(r) if r.status_code == 200 else ())
            except httpx.HTTPError as e:
                status, routes = type(e).__name__, ()
            out.append(Sample(start, time.monotonic(), kind, task, status, routes))


def drive(
    url: str, plan: RequestPlan, clients: int, until: float, out: list[Sample], stop: threading.Event | None = None
) -> None:
    """Run `clients` clients until `until` (or `stop` is set: an interrupted soak), appending to `out` as answers
    arrive (others may read it meanwhile)."""
    stop = stop or threading.Event()

    async def main() -> None:
        await asyncio.gather(*[_client(url, plan, k, clients, until, out, stop) for k in range(clients)])

    asyncio.run(main())


def is_5xx(status: str) -> bool:
    return status[:1] == "5"


def summary(samples: Sequence[Sample]) -> dict[str, Any]:
    """Requests, status counts, 5xx, transport errors, and latency percentiles of the 200s."""
    status: dict[str, int] = {}
    for s in samples:
        status[s.status] = status.get(s.status, 0) + 1
    ok = np.array([s.ms for s in samples if s.status == "200"])
    seconds = max(s.end for s in samples) - min(s.start for s in samples) if samples else 0.0
    return {
        "requests": len(samples),
        "status": dict(sorted(status.items())),
        "5xx": sum(n for k, n in status.items() if is_5xx(k)),
        "transport_errors": sum(n for k, n in status.items() if not k[:1].isdigit()),
        "requests_per_s": round(len(samples) / seconds, 2) if seconds > 0 else 0.0,
        **{f"p{q}_ms": round(float(np.percentile(ok, q)), 2) if ok.size else None for q in (50, 90, 99)},
        "max_ms": round(float(ok.max()), 2) if ok.size else None,
    }


def windows(samples: Sequence[Sample], t0: float, width: float = 10.0) -> list[dict[str, Any]]:
    """p50 and p99 of the 200s per `width`-second window of request ends, from `t0`."""
    by_window: dict[int, list[Sample]] = {}
    for s in samples:
        by_window.setdefault(int((s.end - t0) // width), []).append(s)
    out = []
    for k in sorted(by_window):
        ms = np.array([s.ms for s in by_window[k] if s.status == "200"])
        out.append(
            {
                "t": round(k * width, 1),
                "requests": len(by_window[k]),
                "p50_ms": round(float(np.percentile(ms, 50)), 2) if ms.size else None,
                "p99_ms": round(float(np.percentile(ms, 99)), 2) if ms.size else None,
                "5xx": sum(is_5xx(s.status) for s in by_window[k]),
            }
        )
    return out

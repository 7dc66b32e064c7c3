"""Hostile clients: the costliest requests the default limits allow, measured beside normal clients in one run.

First a window of normal clients alone (1-image zero-shot requests with 2 fixed labels), then the same clients
with hostile ones beside them; the ratio of the normal clients' p99 latencies is the figure.
"""

from __future__ import annotations

import asyncio
import base64
import math
import secrets
import struct
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from benchmarks.loadgen import run_load

from .procstat import wait_idle
from .traffic import status_of

Payload = Callable[[], dict[str, Any]]  # httpx kwargs of one hostile POST /classify, new labels each call
NORMAL_LABELS = ("cat", "dog")


@dataclass(frozen=True)
class HostileConfig:
    """Sizes at the default limits (max_images 64, max_pixels 24 MP, max_request_pixels 128 MP, max_labels 1000,
    max_label_chars 200)."""

    clients: int = 4
    normal_clients: int = 4
    seconds: float = 45.0  # each window
    drain_seconds: float = 600.0  # how long to wait for the server to finish what the hostile clients left
    images: int = 64
    width: int = 4000
    height: int = 6000
    labels: int = 1000
    label_chars: int = 200
    max_request_pixels: int = 128_000_000  # the server's limit: how many big images one request may carry


def solid_png(width: int, height: int, depth: int = 8, alpha: bool = False, interlace: bool = False) -> bytes:
    """A solid-colour PNG written row by row: megapixels that compress to kilobytes (depth 8 or 16)."""
    channels = 4 if alpha else 3
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    squeeze = zlib.compressobj(9)
    parts = []
    for x0, y0, dx, dy in passes if interlace else ((0, 0, 1, 1),):  # Adam7: seven sub-images
        w, h = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        row = b"\x00" + b"\x5a" * (w * channels * depth // 8)  # filter byte 0, then the pixels
        parts += [squeeze.compress(row) for _ in range(h if w else 0)]
    parts.append(squeeze.flush())
    header = struct.pack(">IIBBBBB", width, height, depth, 6 if alpha else 2, 0, 0, int(interlace))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def new_labels(n: int, chars: int) -> list[str]:
    """`n` random labels of `chars` characters: never seen before, so never in the text cache."""
    return [secrets.token_hex((chars + 1) // 2)[:chars] for _ in range(n)]


def _files(data: Sequence[bytes]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("images", (f"{i}.png", d)) for i, d in enumerate(data)]


def hostile_payloads(cfg: HostileConfig, images: Sequence[bytes], task: str | None) -> dict[str, Payload]:
    """Each kind of hostile request; `task` (an active task) adds the adapted-text kind."""
    n, mp = cfg.images, f"{cfg.width * cfg.height / 1e6:g} MP"
    n_big = max(1, min(n, cfg.max_request_pixels // (cfg.width * cfg.height)))  # the most one request may decode
    big = [solid_png(cfg.width, cfg.height)] * n_big
    deep = [solid_png(cfg.width, cfg.height, depth=16, alpha=True, interlace=True)] * n_big
    ordinary = [base64.b64encode(images[i % len(images)]).decode() for i in range(n)]

    def labelled(files: list, task: str = "zero-shot") -> Payload:
        return lambda: {"files": files, "data": {"labels": new_labels(cfg.labels, cfg.label_chars), "task": task}}

    def fixed(files: list) -> Payload:  # cached labels: all the cost is in decoding
        return lambda: {"files": files, "data": {"labels": list(NORMAL_LABELS)}}

    kinds: dict[str, Payload] = {
        f"1 image, {cfg.labels} new labels": labelled(_files(images[:1])),
        f"{n_big} x {mp} PNG": fixed(_files(big)),
        f"JSON base64, {n} images, {cfg.labels} new labels": lambda: {
            "json": {"images": ordinary, "labels": new_labels(cfg.labels, cfg.label_chars), "task": "zero-shot"}
        },
        f"{n_big} x {mp} 16-bit RGBA interlaced PNG": fixed(_files(deep)),
        f"{n} images, cached labels": fixed(_files([images[i % len(images)] for i in range(n)])),
    }
    if task is not None:  # a task's adapted text tower costs more per prompt than the frozen one
        kinds[f"1 image pinned to {task}, {cfg.labels} new labels"] = labelled(_files(images[:1]), task)
    return kinds


def normal_factory(images: Sequence[bytes]) -> Callable[[int], dict[str, Any]]:
    """The normal request: 1 image, zero-shot, 2 fixed labels (their embeddings stay cached)."""
    return lambda i: {
        "files": _files([images[i % len(images)]]),
        "data": {"labels": list(NORMAL_LABELS), "task": "zero-shot"},
    }


async def _hostile_client(
    url: str, kinds: list[tuple[str, Payload]], first: int, out: list, started: Callable[[], None]
) -> None:
    """Posts hostile requests back to back until cancelled; a request cut off by the cancel is `unfinished`."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        i = first
        while True:
            kind, make = kinds[i % len(kinds)]
            i += 1
            kwargs = make()
            start = time.monotonic()
            started()
            try:
                status = status_of(await http.post("/classify", **kwargs))
            except httpx.HTTPError as e:  # the server dropped the connection or is gone: this client stops
                out.append((kind, type(e).__name__, time.monotonic() - start))
                return
            except asyncio.CancelledError:
                out.append((kind, "unfinished", time.monotonic() - start))
                raise
            out.append((kind, status, time.monotonic() - start))


async def _beside_hostile(
    url: str, cfg: HostileConfig, kinds: dict[str, Payload], normal: Callable[[int], dict[str, Any]]
) -> tuple[Any, list]:
    """The normal clients' load result while the hostile clients post, and what each hostile request got."""
    out: list[tuple[str, str, float]] = []
    all_started, count = asyncio.Event(), [0]

    def started() -> None:
        count[0] += 1
        if count[0] >= cfg.clients:
            all_started.set()

    order = list(kinds.items())
    clients = [asyncio.create_task(_hostile_client(url, order, k, out, started)) for k in range(cfg.clients)]
    try:
        await asyncio.wait_for(all_started.wait(), 60)  # every hostile client has a request under way
        result = await run_load(url, normal, cfg.normal_clients, 10**9, cfg.seconds)
    finally:
        for c in clients:
            c.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    return result, out


def _per_kind(records: list[tuple[str, str, float]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for kind, status, seconds in records:
        entry = out.setdefault(kind, {"status": {}, "seconds": []})
        entry["status"][status] = entry["status"].get(status, 0) + 1
        entry["seconds"].append(seconds)
    for entry in out.values():
        entry["p50_s"] = round(float(np.median(entry.pop("seconds"))), 3)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing (no request answered in that window: NaN)."""
    return round(a / b, 3) if a and b and math.isfinite(a) and math.isfinite(b) else None


def run_hostile(url: str, pid: int, cfg: HostileConfig, images: Sequence[bytes], task: str | None) -> dict[str, Any]:
    """Normal clients alone, then beside `cfg.clients` hostile ones; p50/p99 of both windows and their ratios.

    Afterwards, how long the server stayed busy with requests whose hostile clients had gone (`drain_s`).
    """
    kinds = hostile_payloads(cfg, images, task)
    normal = normal_factory(images)
    wait_idle(pid, 60)  # what came before has finished
    _say(f"{cfg.seconds:g} s of {cfg.normal_clients} normal clients alone")
    t0 = time.monotonic()
    alone = asyncio.run(run_load(url, normal, cfg.normal_clients, 10**9, cfg.seconds))
    t1 = time.monotonic()
    _say(f"{cfg.seconds:g} s beside {cfg.clients} hostile clients")
    beside, records = asyncio.run(_beside_hostile(url, cfg, kinds, normal))
    t2 = time.monotonic()
    _say(f"waiting up to {cfg.drain_seconds:g} s for the server to finish the hostile requests left behind")
    drain = wait_idle(pid, cfg.drain_seconds)
    _say(f"idle after {drain} s" if drain is not None else "still busy, or gone")
    statuses = [s for _, s, _ in records]
    return {
        "settings": vars(cfg) | {"kinds": list(kinds), "normal_labels": list(NORMAL_LABELS)},
        "spans": [t0, t1, t2, time.monotonic()],
        "alone": alone.as_dict(),
        "beside_hostile": beside.as_dict(),
        "p50_ratio_hostile": _ratio(beside.p50_ms, alone.p50_ms),
        "p99_ratio_hostile": _ratio(beside.p99_ms, alone.p99_ms),
        "hostile_requests": _per_kind(records),
        "hostile_5xx_not_503": sum(s[:1] == "5" and not s.startswith("503") for s in statuses),
        "hostile_transport_errors": sum(not s[:1].isdigit() and s != "unfinished" for s in statuses),
        "drain_s": drain,
    }


def _say(text: str) -> None:
    print(f"hostile: {text}", file=sys.stderr, flush=True)

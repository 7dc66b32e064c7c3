"""Where one client's latency goes: `python -m benchmarks.latency` (under a minute on the tiny backbone).

A server holding one synthetic task answers one pinned image at a time. Side by side, in alternating rounds:
- the p50 that `ClipbankClient` (httpx) sees, and the model-only time (`benchmarks.serve.pinned_latency`: the
  same classification in this process, on one thread): the ratio `bench serve` reports;
- the same request sent with the standard library's `http.client` (a lean client), and the server's own split of
  its time (`timing`: decoding, queueing, compute, total);
- the floor of the HTTP stack: `GET /healthz` with each client.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from service.client import ClipbankClient

from .process import server_process
from .serve import TOKEN, _push, pinned_latency
from .serve_run import default_images, prepare_backend

TIMING = ("decode_ms", "queue_ms", "compute_ms", "total_ms")


def multipart_body(fields: Sequence[tuple[str, str]], files: Sequence[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its Content-Type, built by hand (no client library in the way); a field
    may repeat."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields]
    for i, (name, data) in enumerate(files):
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{i}.png"\r\n\r\n'
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _p50(values: list[float]) -> float:
    return round(statistics.median(values[len(values) // 4 :]), 3)  # the first quarter is warm-up


def _timed(call: Callable[[], Any], n: int) -> tuple[list[float], list[Any]]:
    seen, out = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        out.append(call())
        seen.append((time.perf_counter() - t0) * 1000)
    return seen, out


def raw_latency(url: str, task: str, image: bytes, n: int) -> dict[str, float]:
    """One keep-alive `http.client` connection, one pinned image per request: the p50 it sees and the p50 of each
    of the server's own timing fields."""
    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port)
    body, ctype = multipart_body([("task", task)], [("images", image)])

    def call() -> dict[str, Any]:
        conn.request("POST", "/classify", body, {"Content-Type": ctype})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST /classify answered {response.status}: {data[:300]!r}")
        return json.loads(data)["timing"]

    try:
        seen, timings = _timed(call, n)
    finally:
        conn.close()
    return {"raw_client_p50_ms": _p50(seen), **{f"server_{k}": _p50([t[k] for t in timings]) for k in TIMING}}


def http_floor(url: str, n: int) -> dict[str, float]:
    """`GET /healthz` round trips: what the HTTP stack costs with nothing else to do."""
    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port)

    def raw() -> None:
        conn.request("GET", "/healthz")
        conn.getresponse().read()

    with httpx.Client(base_url=url) as client:
        floor = {"healthz_httpx_p50_ms": _p50(_timed(lambda: client.get("/healthz"), n)[0])}
    floor["healthz_raw_p50_ms"] = _p50(_timed(raw, n)[0])
    conn.close()
    return floor


def run(backbone: str, requests: int, rounds: int) -> dict[str, Any]:
    backend = prepare_backend(backbone, backbone, 1)
    image, task = default_images()[0], backend.task_names[0]
    args = ("--backbone", backbone, "--log-level", "warning")
    rows = []
    env = {"CLIPBANK_ADMIN_TOKEN": TOKEN}
    with tempfile.TemporaryDirectory() as tmp, server_process(Path(tmp), args, env) as (url, _):
        with ClipbankClient(url, TOKEN) as client:
            _push(client, backend.bundles[0], 0, image)
            for r in range(rounds):
                row = {"round": r, **pinned_latency(client, backend, image, requests)}
                row.update(raw_latency(url, task, image, requests))
                row.update(http_floor(url, requests))
                row["latency_1client_vs_single_thread"] = round(row["client_p50_ms"] / row["model_p50_ms"], 3)
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    medians = {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0] if k != "round"}
    return {"backbone": backbone, "requests": requests, "rounds": rows, "median": medians}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--requests", type=int, default=300, help="requests per client and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", help="write the report here as JSON")
    a = p.parse_args(argv)
    if a.requests < 1 or a.rounds < 1:
        p.error(f"--requests and --rounds must be >= 1, got {a.requests} and {a.rounds}")
    if a.out and (Path(a.out).is_dir() or not Path(a.out).parent.is_dir()):  # known before a minute of work
        p.error(f"--out names the JSON file to write; {a.out} is a folder, or its folder does not exist")
    report = run(a.backbone, a.requests, a.rounds)
    print(json.dumps(report["median"], indent=1))  # first: a file that cannot be written loses nothing
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

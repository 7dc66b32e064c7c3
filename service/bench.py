"""Service figures on a real server process: latency at given concurrencies, upload-to-routable time, RSS."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .client import ClipbankClient, ClipbankHTTPError
from .loadgen import run_load
from .process import server_process

TOKEN = "bench-admin-token-0123456789"


@dataclass
class TaskSample:
    """A bundle to push and a few images of its domain (to see it routed)."""

    bundle: bytes
    images: list[bytes]


@dataclass
class ServiceBenchConfig:
    tasks: Sequence[TaskSample]
    outside: list[bytes]  # images no task should claim
    labels: tuple[str, ...] = ("one", "two", "three")
    concurrency: tuple[int, ...] = (1, 16)
    requests: int = 400
    max_seconds: float = 30.0
    images_per_request: int = 1
    backbone: str = "tiny"
    server_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _factory(images: list[bytes], labels: tuple[str, ...], per_request: int):
    def make(i: int) -> dict[str, Any]:
        files = [("images", (f"{k}.png", images[(i * per_request + k) % len(images)])) for k in range(per_request)]
        return {"files": files, "data": {"labels": list(labels)}}

    return make


def _load_rows(url: str, images: list[bytes], cfg: ServiceBenchConfig, mode: str) -> list[dict[str, Any]]:
    rows = []
    for c in cfg.concurrency:
        result = asyncio.run(
            run_load(url, _factory(images, cfg.labels, cfg.images_per_request), c, cfg.requests, cfg.max_seconds)
        )
        rows.append({"mode": mode, **result.as_dict()})
    return rows


def _push_until_routable(client: ClipbankClient, sample: TaskSample) -> dict[str, Any]:
    """Upload, then classify with the task pinned until the answer comes from the new bundle (deadline 30 s)."""
    start = time.perf_counter()
    up = client.push(sample.bundle)
    uploaded = time.perf_counter()
    deadline = uploaded + 30
    while True:
        try:  # pinned, so a task whose domain an older task also claims counts as soon as it can be reached
            routes = [r["route"] for r in client.classify(sample.images[:1], task=up["task"])["results"]]
        except ClipbankHTTPError as e:
            if e.code != "task_not_found":
                raise
            routes = []
        if any(r["bundle_id"] == up["bundle_id"] for r in routes):
            break
        if time.perf_counter() > deadline:
            raise TimeoutError(f"task {up['task']} not routable 30 s after its upload")
    routable = time.perf_counter()
    return {
        "task": up["task"],
        "bytes": len(sample.bundle),
        "upload_s": round(uploaded - start, 4),
        "upload_end_to_routable_s": round(routable - uploaded, 4),
    }


def bench_service(cfg: ServiceBenchConfig) -> dict[str, Any]:
    """Zero-shot load on an empty bank, push every task (timed), then mixed auto load; RSS at both points."""
    report: dict[str, Any] = {"backbone": cfg.backbone, "tasks": len(cfg.tasks), "load": [], "pushes": []}
    args = ("--backbone", cfg.backbone, "--log-level", "warning", *cfg.server_args)
    with (
        tempfile.TemporaryDirectory() as tmp,
        server_process(Path(tmp), args, {"CLIPBANK_ADMIN_TOKEN": TOKEN, **cfg.env}) as (
            url,
            pid,
        ),
    ):
        report["load"] += _load_rows(url, cfg.outside, cfg, "zero-shot, 0 tasks")
        report["rss_bytes"] = {"0": rss_bytes(pid)}
        with ClipbankClient(url, TOKEN) as client:
            for sample in cfg.tasks:
                report["pushes"].append(_push_until_routable(client, sample))
        mixed = [im for s in cfg.tasks for im in s.images] + list(cfg.outside)
        mixed = [mixed[(i * 7) % len(mixed)] for i in range(len(mixed))]  # interleave domains
        report["load"] += _load_rows(url, mixed, cfg, f"auto, {len(cfg.tasks)} tasks, mixed traffic")
        report["rss_bytes"][str(len(cfg.tasks))] = rss_bytes(pid)
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"backbone {report['backbone']}",
        "",
        "| traffic | concurrency | requests | errors | images/s | p50 ms | p95 ms | p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["load"]:
        lines.append(
            f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['images_per_s']} | "
            f"{r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} |"
        )
    lines += ["", "| task | bundle bytes | upload s | upload end to routable s |", "| --- | --- | --- | --- |"]
    for p in report["pushes"]:
        lines.append(f"| {p['task']} | {p['bytes']} | {p['upload_s']} | {p['upload_end_to_routable_s']} |")
    rss = report["rss_bytes"]
    lines += ["", "RSS: " + ", ".join(f"{k} tasks {v / 2**20:.1f} MiB" for k, v in rss.items())]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(format_report(report) + "\n")

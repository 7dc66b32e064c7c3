"""`clipbank bench serve`: real server processes driven from a loopback client, side by side in one run.

For each backbone: (a) the naive baseline server (`benchmarks.baseline`) and the LitServe peer
(`benchmarks.litserve_peer`), (b) clipbank with an empty bank (zero-shot), (c) clipbank in auto mode with tasks in
the bank and really auto-routed traffic, and the same server as its bank grows: throughput, resident memory and
hot-swap time at each size. Then the ONNX Runtime frozen pass beside PyTorch.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.client import ClipbankClient, ClipbankHTTPError

from .loadgen import run_load
from .process import command_process, free_port, peer_env, server_process

TOKEN = "bench-admin-token-0123456789"
PAIRED_ROUNDS = 3


@dataclass
class Backend:
    """One backbone to benchmark, with its synthetic bundles (pushed in order) and what its passes cost."""

    label: str
    backbone: str  # reference for both servers
    bundles: list[bytes]
    tensor_bytes: list[int]  # per bundle
    task_names: list[str]
    flops: dict[str, int]
    loaded: Any = field(default=None, repr=False)  # the Backbone, as loaded in this process
    traffic: list[list[bytes]] = field(default_factory=list, repr=False)  # per task: PNGs its selector should claim


@dataclass
class ServeBenchConfig:
    images: list[bytes]  # request images (one per request)
    labels: tuple[str, ...] = ("cat", "dog", "car", "tree", "house")
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    growth: tuple[int, ...] = (0, 1, 10, 50, 100)  # bank sizes measured; the largest is how many are pushed
    auto_tasks: int = 10  # bank size of the auto-mode comparison (run at every concurrency)
    routed_per_5: int = 4  # of every 5 requests this many carry a task's image (auto) or are pinned (pinned rows)
    key_concurrency: int = 16
    requests: int = 400
    max_seconds: float = 30.0
    onnx: bool = True
    litserve: bool = True  # the LitServe peer (benchmarks/litserve_peer.py) beside the naive baseline
    onnx_concurrency: tuple[int, ...] = (1, 16)
    prefix: bool = True  # auto mode with experts in the top K blocks, K in L, L/2, L/4 (benchmarks/serve_prefix.py)
    latency_requests: int = 200  # one client, pinned, one request at a time: the 1-client latency ratios
    server_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    judged: bool = False  # the full run, whose ratios report.md holds against the goals (`bench serve`)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _settled_rss(pid: int) -> int:
    """RSS once the server has idled past a store poll, which returns freed heap memory to the system."""
    time.sleep(2.5)
    return rss_bytes(pid)


def _zero_shot_factory(cfg: ServeBenchConfig):
    def make(i: int) -> dict[str, Any]:
        data = {"labels": list(cfg.labels), "match_labels": "false"}  # with tasks in the bank, the selectors decide
        return {"files": [("images", ("x.png", cfg.images[i % len(cfg.images)]))], "data": data}

    return make


def _task_turn(cfg: ServeBenchConfig, i: int, n: int) -> int | None:
    """Request i's task in turn over n tasks (`routed_per_5` of every 5 requests), or None: an outside image."""
    if not n or i % 5 >= cfg.routed_per_5:
        return None
    return (i // 5 * cfg.routed_per_5 + i % 5) % n


def _pinned_factory(cfg: ServeBenchConfig, tasks: Sequence[str]):
    """`routed_per_5` of 5 requests pinned to the tasks in turn (their own classes); the others auto, with labels,
    on outside images."""
    zero_shot = _zero_shot_factory(cfg)

    def make(i: int) -> dict[str, Any]:
        t = _task_turn(cfg, i, len(tasks))
        if t is None:
            return zero_shot(i)
        return {"files": [("images", ("x.png", cfg.images[i % len(cfg.images)]))], "data": {"task": tasks[t]}}

    return make


def _auto_factory(cfg: ServeBenchConfig, traffic: Sequence[Sequence[bytes]]):
    """Really auto-routed traffic: every request is auto with labels and no pin; `routed_per_5` of 5 carry an
    image of a task's own family (tasks in turn), the others an outside image. The selectors decide each one: the
    task images go with `match_labels=false`, as their labels are no task's (label-aware routing would send them
    all to zero-shot CLIP and measure nothing of the routed path)."""
    zero_shot = _zero_shot_factory(cfg)

    def make(i: int) -> dict[str, Any]:
        t = _task_turn(cfg, i, len(traffic))
        if t is None:
            return zero_shot(i)
        own = traffic[t]
        data = {"labels": list(cfg.labels), "match_labels": "false"}  # the selectors decide, not the labels
        return {"files": [("images", ("x.png", own[i // 5 % len(own)]))], "data": data}

    return make


def traffic_routing(client: ClipbankClient, cfg: ServeBenchConfig, backend: Backend, n_tasks: int) -> dict:
    """Where the selectors send the auto traffic of the first `n_tasks` tasks (each distinct image once): the share
    of task images routed to some task and to their own, and the share of outside images left to zero-shot."""
    own = routed = total = 0
    for name, images in zip(backend.task_names[:n_tasks], backend.traffic[:n_tasks], strict=True):
        for r in client.classify(list(images), labels=cfg.labels, match_labels=False)["results"]:
            total += 1
            routed += r["route"]["task"] is not None
            own += r["route"]["task"] == name
    outside = client.classify(list(cfg.images), labels=cfg.labels, match_labels=False)["results"]
    fallback = sum(r["route"]["task"] is None for r in outside)
    return {
        "task_images": total,
        "routed": round(routed / max(total, 1), 4),
        "own_task": round(own / max(total, 1), 4),
        "outside_fallback": round(fallback / max(len(outside), 1), 4),
    }


def _level(url: str, make, c: int, cfg: ServeBenchConfig, **tags: Any) -> dict[str, Any]:
    result = asyncio.run(run_load(url, make, c, max(cfg.requests, 2 * c), cfg.max_seconds))
    row = {**tags, **result.as_dict()}
    print(
        f"  {tags.get('server')}/{tags.get('runtime', '-')} tasks={tags.get('tasks', 0)} c={c}: "
        f"{row['images_per_s']} img/s, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, errors {row['errors']}",
        file=sys.stderr,
        flush=True,
    )
    return row


def pinned_latency(client: ClipbankClient, backend: Backend, image: bytes, n: int = 200) -> dict[str, float]:
    """One client, one image pinned to the first task, one request at a time: the p50 seen by the client and
    the server's own `total_ms` and `compute_ms`, beside the same classification run here, in this process on
    the thread that loaded the model (the model-only time: no HTTP, no decoding, one thread)."""
    import io

    import torch
    from PIL import Image

    from model_store.bank import build_bank, empty_bank
    from model_store.bundle import read_bundle
    from model_store.inference import ClassifyItem, TextCache, classify_batch

    seen, total, compute = [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        files = [("images", ("x.png", image))]
        out = client._call("POST", "/classify", files=files, data={"task": backend.task_names[0]})
        seen.append((time.perf_counter() - t0) * 1000)
        total.append(out["timing"]["total_ms"])
        compute.append(out["timing"]["compute_ms"])
    bb = backend.loaded
    bank = build_bank(bb, [read_bundle(backend.bundles[0])], (), 1, empty_bank(bb))
    x = bb.preprocess(Image.open(io.BytesIO(image)).convert("RGB"))[None]
    cache, model, threads = TextCache(), [], torch.get_num_threads()
    torch.set_num_threads(1)  # as said: it ran on every core, and beside any busy process took 1 s, not 5 ms
    try:
        with torch.inference_mode():
            for _ in range(n):
                t0 = time.perf_counter()
                classify_batch(bank, [ClassifyItem(x, None, task=backend.task_names[0])], cache)
                model.append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(threads)
    skip = n // 4  # warm-up
    runs = {"client": seen, "server": total, "compute": compute, "model": model}
    return {f"{k}_p50_ms": round(statistics.median(v[skip:]), 3) for k, v in runs.items()}


def _push(client: ClipbankClient, data: bytes, bank_size: int, image: bytes) -> dict[str, Any]:
    """Upload; then classify pinned to the task until the answer comes from the new bundle (deadline 30 s)."""
    start, forced = time.perf_counter(), False
    try:
        up = client.push(data)
    except ClipbankHTTPError as e:  # a synthetic selector claims too much for the gate: measure it all the same
        if e.code != "interference":
            raise
        up, forced = client.push(data, force=True), True
    uploaded = time.perf_counter()
    while True:
        try:
            routes = [r["route"] for r in client.classify([image], task=up["task"])["results"]]
        except ClipbankHTTPError as e:
            if e.code != "task_not_found":
                raise
            routes = []
        if any(r["bundle_id"] == up["bundle_id"] for r in routes):
            break
        if time.perf_counter() > uploaded + 30:
            raise TimeoutError(f"task {up['task']} not routable 30 s after its upload")
    return {
        "bank_size": bank_size,
        "task": up["task"],
        "bytes": len(data),
        "upload_s": round(uploaded - start, 4),
        "upload_end_to_routable_s": round(time.perf_counter() - uploaded, 4),
        "forced": forced,  # refused by the interference gate, then uploaded with force=true
    }


PEERS = {"baseline": "benchmarks.baseline", "litserve": "benchmarks.litserve_peer"}


def _peer_rows(backend: Backend, cfg: ServeBenchConfig, peer: str) -> list[dict[str, Any]]:
    """Zero-shot load levels on a peer server (`PEERS`), which knows no tasks."""
    port = free_port()
    cmd = [sys.executable, "-m", PEERS[peer], "--backbone", backend.backbone, "--port", str(port)]
    with command_process(cmd, port, peer_env(cfg.env)) as (url, _):
        make = _zero_shot_factory(cfg)
        return [_level(url, make, c, cfg, server=peer, mode="zero-shot", tasks=0) for c in cfg.concurrency]


def _clipbank_rows(backend: Backend, cfg: ServeBenchConfig, runtime: str) -> dict[str, Any]:
    """One server: zero-shot levels, then push tasks one by one, measuring at the growth sizes."""
    full = runtime == "torch"
    conc = cfg.concurrency if full else cfg.onnx_concurrency
    sizes = sorted(set(cfg.growth) | {cfg.auto_tasks}) if full else [0, cfg.auto_tasks]
    out: dict[str, Any] = {"load": [], "rss_bytes": {}, "pushes": []}
    args = ("--backbone", backend.backbone, "--log-level", "warning", "--frozen-runtime", runtime, *cfg.server_args)
    env = {"CLIPBANK_ADMIN_TOKEN": TOKEN, **cfg.env}
    with tempfile.TemporaryDirectory() as tmp, server_process(Path(tmp), args, env) as (url, pid):
        tag = {"server": "clipbank", "runtime": runtime}
        out["load"] += [_level(url, _zero_shot_factory(cfg), c, cfg, **tag, mode="zero-shot", tasks=0) for c in conc]
        out["rss_bytes"]["0"] = _settled_rss(pid)
        with ClipbankClient(url, TOKEN) as client:
            for k in range(1, max(sizes) + 1):
                out["pushes"].append(_push(client, backend.bundles[k - 1], k - 1, cfg.images[0]))
                if k == 1 and full:
                    out["latency_1client"] = pinned_latency(client, backend, cfg.images[0], cfg.latency_requests)
                if k not in sizes:
                    continue
                make = _auto_factory(cfg, backend.traffic[:k])
                # every concurrency at 1 task too: the first auto batches of each size warm caches once (kernels,
                # buffers), which must be in the 1-task RSS, not charged to the tasks pushed after it
                levels = conc if k in (1, cfg.auto_tasks) else (cfg.key_concurrency,)
                out["load"] += [_level(url, make, c, cfg, **tag, mode="auto", tasks=k) for c in levels]
                if k == cfg.auto_tasks and full:
                    out["routing"] = traffic_routing(client, cfg, backend, k)
                    pinned = _pinned_factory(cfg, backend.task_names[:k])
                    out["load"].append(_level(url, pinned, cfg.key_concurrency, cfg, **tag, mode="pinned", tasks=k))
                out["rss_bytes"][str(k)] = _settled_rss(pid)
        if full and max(sizes) > 1:
            # the growth ratio's two sides route different shares of their traffic (one family against all of
            # them): measured here, so that `serve_run.ratios` can also compare them at equal work
            with ClipbankClient(url, TOKEN) as client:
                big = traffic_routing(client, cfg, backend, max(sizes))
            out["paired"], one = _paired(url, backend, cfg, args, env, max(sizes))
            out["routing_by_tasks"] = {"1": one, str(max(sizes)): big}
        if full and len(backend.bundles) > max(sizes):  # the next bundle scores traffic in shadow, every other round
            from .shadow_cost import shadow_rounds

            with ClipbankClient(url, TOKEN) as client:
                client.push(backend.bundles[max(sizes)], mode="shadow")
            half = ServeBenchConfig(**{**vars(cfg), "max_seconds": cfg.max_seconds / 2, "requests": cfg.requests // 2})
            out["shadow"] = shadow_rounds(url, backend.task_names[max(sizes)], half, PAIRED_ROUNDS + 1)
    return out


def _paired(url: str, backend: Backend, cfg: ServeBenchConfig, args, env, big: int) -> tuple[list[dict], dict]:
    """Throughput with `big` tasks against a second server holding 1 task, in alternating rounds, so that drifts
    in the machine's speed affect both alike (the growth series above is measured minutes apart); and where the
    1-task server routes its traffic (`traffic_routing`)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp, server_process(Path(tmp), args, env) as (small_url, _):
        with ClipbankClient(small_url, TOKEN) as client:
            _push(client, backend.bundles[0], 0, cfg.images[0])
            routing = traffic_routing(client, cfg, backend, 1)
        half = ServeBenchConfig(**{**vars(cfg), "max_seconds": cfg.max_seconds / 2, "requests": cfg.requests // 2})
        for r in range(PAIRED_ROUNDS):
            for tasks, where in ((1, small_url), (big, url)):
                make = _auto_factory(cfg, backend.traffic[:tasks])
                row = _level(where, make, cfg.key_concurrency, half, server="clipbank", runtime="torch", tasks=tasks)
                rows.append({**row, "mode": "auto", "round": r})
    return rows, routing


def find_row(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def bench_backend(backend: Backend, cfg: ServeBenchConfig) -> dict[str, Any]:
    print(f"{backend.label}: baseline", file=sys.stderr, flush=True)
    report: dict[str, Any] = {"label": backend.label, "backbone": backend.backbone, "flops": backend.flops}
    report["load"] = _peer_rows(backend, cfg, "baseline")
    if cfg.litserve:
        print(f"{backend.label}: LitServe peer", file=sys.stderr, flush=True)
        report["load"] += _peer_rows(backend, cfg, "litserve")
    print(f"{backend.label}: clipbank, PyTorch frozen pass", file=sys.stderr, flush=True)
    torch_run = _clipbank_rows(backend, cfg, "torch")
    report["load"] += torch_run["load"]
    report["rss_bytes"] = torch_run["rss_bytes"]
    report["pushes"] = torch_run["pushes"]
    report["latency_1client"] = torch_run.get("latency_1client", {})
    report["paired"] = torch_run.get("paired", [])
    report["shadow"] = torch_run.get("shadow", [])
    report["routing"] = torch_run.get("routing", {})
    report["routing_by_tasks"] = torch_run.get("routing_by_tasks", {})
    if cfg.onnx:
        for runtime in ("onnx", "onnx-int8"):
            print(f"{backend.label}: clipbank, ONNX Runtime frozen pass ({runtime})", file=sys.stderr, flush=True)
            report["load"] += _clipbank_rows(backend, cfg, runtime)["load"]
    report["tensor_bytes"] = backend.tensor_bytes
    return report

"""`clipbank bench scale`: the Ray Serve engine on this machine (docs/scale-out.md).

A local Ray cluster serves the app over one local folder store. First 1, 2 and 3 replicas each take 16 clients
for a while (throughput per replica count). Then, at the largest count, a task's two versions are swapped 50 times
with the broadcast on and 50 times with polling only, while the 16 clients keep classifying (every non-200 is
counted); each swap is timed until every replica serves its generation, read from the replicas themselves by a
`sync(0)` call, which changes nothing. Last, one replica's process gets SIGKILL, timed until a replacement serves
the current generation.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from model_store.machine import machine_facts, machine_line

from .loadgen import run_load

TOKEN = "bench-scale-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLIENTS = 16
TASK = "bench"
# auto requests routed by the selectors alone: the labels "a", "b" are no task's (label-aware routing would send
# every image to zero-shot CLIP)
AUTO_FORM = {"labels": ["a", "b"], "match_labels": "false"}


@dataclass(frozen=True)
class ScaleBenchConfig:
    replicas: tuple[int, ...] = (1, 2, 3)
    seconds: float = 20.0  # load per replica count
    swaps: int = 50
    poll_seconds: float = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replicas_now() -> dict[str, dict[str, int]]:
    """{replica: {generation, pid}} straight from every live replica (a `sync(0)` refreshes nothing)."""
    from ray import serve

    from service.ray_engine import APP_NAME, DEPLOYMENT

    answers = serve.get_deployment_handle(DEPLOYMENT, APP_NAME).broadcast("sync", 0).results(timeout_s=30)
    return {a["replica"]: a for a in answers}


def until_all_at(generation: int, replicas: int, deadline_s: float = 60) -> float:
    """Seconds until `replicas` replicas all serve `generation` or later, polled every 10 ms."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < deadline_s:
        try:
            seen = replicas_now()
        except Exception:  # a replica being replaced
            seen = {}
        if len(seen) == replicas and min(a["generation"] for a in seen.values()) >= generation:
            return time.perf_counter() - t0
        time.sleep(0.01)
    raise RuntimeError(f"not every replica reached generation {generation} within {deadline_s} s")


def deploy(config, replicas: int) -> None:
    from ray import serve

    from service.ray_engine import APP_NAME, application

    serve.run(application(config, replicas), name=APP_NAME, route_prefix="/")
    deadline = time.monotonic() + 300
    while len(replicas_now()) != replicas:  # after a scale-down the old ones drain
        if time.monotonic() > deadline:
            raise RuntimeError(f"{replicas} replicas did not come up within 300 s")
        time.sleep(0.5)


class Clients:
    """16 threads classifying until stopped; the statuses they got."""

    def __init__(self, url: str, images: list[bytes]) -> None:
        self.url, self.images = url, images
        self.stop, self.status, self.lock = threading.Event(), {}, threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(CLIENTS)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while not self.stop.is_set():
                files = [("images", ("x.png", self.images[i % len(self.images)]))]
                try:
                    status = str(http.post("/classify", files=files, data=AUTO_FORM).status_code)
                except httpx.HTTPError as e:
                    status = type(e).__name__
                with self.lock:
                    self.status[status] = self.status.get(status, 0) + 1
                i += 1

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def swaps(url: str, replicas: int, n: int) -> list[float]:
    """Alternate the task between versions 1 and 2: seconds until every replica serves each change."""
    out = []
    with httpx.Client(base_url=url, timeout=120, headers=AUTH) as http:
        for i in range(n):
            answer = http.post(f"/tasks/{TASK}/activate", json={"version": 1 + (i + 1) % 2})
            answer.raise_for_status()
            out.append(until_all_at(int(answer.headers["X-Clipbank-Generation"]), replicas))
    return out


def recovery(replicas: int) -> float:
    """SIGKILL one replica's process: seconds until a replacement serves the current generation."""
    before = replicas_now()
    victim, info = next(iter(before.items()))
    generation = max(a["generation"] for a in before.values())
    t0 = time.perf_counter()
    os.kill(info["pid"], signal.SIGKILL)
    while time.perf_counter() - t0 < 120:
        try:
            now = replicas_now()
        except Exception:
            now = {}
        if victim not in now and len(now) == replicas and min(a["generation"] for a in now.values()) >= generation:
            return time.perf_counter() - t0
        time.sleep(0.05)
    raise RuntimeError("the killed replica was not replaced within 120 s")


def percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}_s": round(float(np.percentile(values, q)), 3) for q in (50, 99)} | {"n": len(values)}


def seed_store(root: str, backbone_ref: str) -> None:
    """Task `bench` with versions 1 and 2 (a synthetic bundle, re-issued), version 1 active."""
    from model_store.backbone import load_backbone
    from model_store.bank import empty_bank
    from model_store.store import open_store

    from .swapper import revised_bundle
    from .synthetic import synthetic_bundle

    first = synthetic_bundle(empty_bank(load_backbone(backbone_ref, "cpu")), TASK)
    store = open_store(root)
    store.put(first)
    store.put(revised_bundle(first, 2), activate=False)


def measure(url: str, config, cfg: ScaleBenchConfig, images: list[bytes]) -> dict[str, Any]:
    report: dict[str, Any] = {"throughput_by_replicas": {}, "load": {}}
    for n in cfg.replicas:
        deploy(config, n)
        load = asyncio.run(run_load(url, lambda i: _form(images, i), CLIENTS, 10**9, cfg.seconds))
        report["throughput_by_replicas"][str(n)] = load.images_per_s
        report["load"][str(n)] = load.as_dict()
    top = max(cfg.replicas)
    with Clients(url, images) as clients:
        broadcast = swaps(url, top, cfg.swaps)
        deploy(replace(config, broadcast=False), top)
        poll_only = swaps(url, top, cfg.swaps)
    report["propagation"] = percentiles(broadcast)
    report["propagation_poll_only"] = percentiles(poll_only)
    report["propagation_p99_s"] = report["propagation"]["p99_s"]
    report["propagation_poll_only_p99_s"] = report["propagation_poll_only"]["p99_s"]
    report["statuses_during_swaps"] = clients.status
    report["errors_during_swaps"] = sum(v for k, v in clients.status.items() if k != "200")
    deploy(config, top)
    report["recovery_s"] = round(recovery(top), 2)
    return report


def _form(images: list[bytes], i: int) -> dict:
    return {"files": [("images", ("x.png", images[i % len(images)]))], "data": AUTO_FORM}


def run_bench_scale(cfg: ScaleBenchConfig) -> dict[str, Any]:
    """The whole run: a local Ray cluster, a seeded store, the measurements; the cluster is gone afterwards."""
    import ray
    from ray import serve

    from service.config import ServeConfig
    from service.ray_engine import APP_NAME

    from .serve_run import default_images

    root = tempfile.mkdtemp(prefix="clipbank-bench-scale-")
    seed_store(root, "tiny")
    port = free_port()
    config = ServeConfig(
        store=root, admin_token=TOKEN, host="127.0.0.1", port=port, poll_seconds=cfg.poll_seconds,
        gate_max_zero_shot=1.0, gate_max_stolen=1.0,  # the swaps measure propagation, not the gate
    )  # fmt: skip
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        report = measure(f"http://127.0.0.1:{port}", config, cfg, default_images())
        serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    report.update(cores=os.cpu_count(), clients=CLIENTS, config=vars(cfg) | {"replicas": list(cfg.replicas)})
    report["machine_facts"] = machine_facts()
    report["machine"] = machine_line(report["machine_facts"])
    return report


def write_report(out: Path, report: dict[str, Any], command: str) -> str:
    """report.json (every figure) and report.md (the table); returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": command, **report}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = "\n".join(f"| {n} | {v} |" for n, v in report["throughput_by_replicas"].items())
    b, p = report["propagation"], report["propagation_poll_only"]
    text = f"""# clipbank bench scale

`{command}`: a local Ray cluster on {report["cores"]} cores, {report["clients"]} clients, one local folder store.

| replicas | images/s (16 clients, zero-shot) |
| --- | --- |
{rows}

| propagation to every replica | p50 | p99 | swaps |
| --- | --- | --- | --- |
| broadcast | {b["p50_s"]} s | {b["p99_s"]} s | {b["n"]} |
| polling only (every {report["config"]["poll_seconds"]} s) | {p["p50_s"]} s | {p["p99_s"]} s | {p["n"]} |

Non-200 answers to the 16 clients during the swaps: {report["errors_during_swaps"]} ({report["statuses_during_swaps"]}).
A replica killed with SIGKILL was replaced and serving the current generation after {report["recovery_s"]} s.

Machine: {report.get("machine", "not recorded")}.
"""
    (out / "report.md").write_text(text)
    return text

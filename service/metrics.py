"""Prometheus metrics, all prefixed `clipbank_`, in a registry of the app's own (so several apps can coexist)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, generate_latest

from model_store.bank import BankSnapshot
from model_store.inference import TextCache

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SWAP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# selector scores are error / threshold: at most 1 claims the image; fine steps around 1, where routing is decided
SCORE_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, float("inf"))


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._backbone: Info | None = None  # made when a backbone is loaded (`observe_backbone`)
        self.replica: str | None = None  # a label on every sample, set by service/ray_engine.py
        self.requests = Counter("clipbank_requests", "HTTP requests", ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram(
            "clipbank_request_seconds",
            "HTTP request latency",
            ["endpoint", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_images = Histogram(
            "clipbank_batch_images", "images per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "clipbank_batch_requests", "requests per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.routes = Counter("clipbank_routes", "images routed, per task (zero-shot: none)", ["task"], registry=r)
        self.auto_images = Counter("clipbank_auto_images", "images classified with task=auto", registry=r)
        self.fallback = Counter(
            "clipbank_zero_shot_fallback",
            "images with task=auto answered by zero-shot CLIP: no task claimed them, or their labels named no class "
            "of the task that did (label_routing_moved counts those too)",
            registry=r,
        )
        self.moved_by_labels = Counter(
            "clipbank_label_routing_moved",
            "images with task=auto that their labels sent elsewhere than the selectors alone would (to zero-shot or "
            "another task); many mean clients name classes otherwise than the tasks do, or traffic asks new concepts",
            registry=r,
        )
        self.generation = Gauge("clipbank_bank_generation", "store generation of the served bank", registry=r)
        self.bank_bytes = Gauge("clipbank_bank_bytes", "bytes of expert, router and selector tensors", registry=r)
        self.bank_tasks = Gauge("clipbank_bank_tasks", "active tasks in the served bank", registry=r)
        self.swap_seconds = Histogram(
            "clipbank_swap_seconds", "seconds to build and swap in a new bank", buckets=SWAP_BUCKETS, registry=r
        )
        self.swap_failures = Counter(
            "clipbank_swap_failures",
            "changes whose bank could not be built or checked (old bank kept); refusals not counted",
            registry=r,
        )
        self.gate_refusals = Counter("clipbank_gate_refusals", "changes the interference gate refused", registry=r)
        self.gate_overrides = Counter("clipbank_gate_overrides", "gate refusals overridden with force", registry=r)
        self._queue(r)
        self.errors = Counter(
            "clipbank_errors",
            "error answers by their code (overloaded, stale_replica, task_not_found, ...): alert on the server's "
            "own (overloaded, store_write_failed, store_not_writable, internal_error), not on what clients cause",
            ["endpoint", "code"],
            registry=r,
        )
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, open files, start time
        self.degraded = Gauge("clipbank_degraded_tasks", "active tasks the bank cannot serve", registry=r)
        self._traffic(r)
        self.task_degraded = Gauge(
            "clipbank_task_degraded", "1 for each active task the bank cannot serve", ["task"], registry=r
        )

    def _queue(self, r: CollectorRegistry) -> None:
        """The work waiting for the compute thread, its bound, and the work of clients that went away."""
        self.queue_images = Gauge("clipbank_queue_images", "images waiting for a batch", registry=r)
        self.admitted_images = Gauge(
            "clipbank_admitted_images",
            "images accepted and not yet answered (decoding, queued or computing): what max_queue_images bounds",
            registry=r,
        )
        self.max_queue_images = Gauge("clipbank_max_queue_images", "the max_queue_images setting", registry=r)
        self.abandoned = Counter(
            "clipbank_abandoned_requests",
            "requests whose clients went away before their answer, left out of the compute thread's work: while "
            "queued for a batch, or between the steps of a batch's image passes or of its new label sets",
            ["stage"],
            registry=r,
        )

    def _traffic(self, r: CollectorRegistry) -> None:
        """Where auto-routed traffic goes, and what versions in shadow would do with it."""
        self.claims = Counter(
            "clipbank_claims",
            "images with task=auto, per route: the task that claimed it, or zero-shot",
            ["route"],
            registry=r,
        )
        self.route_score = Histogram(
            "clipbank_route_score",
            "the lowest selector score (error / threshold) of each image with task=auto, per route it took",
            ["route"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.shadow_images = Counter(
            "clipbank_shadow_images", "images with task=auto scored by a task's version in shadow", ["task"], registry=r
        )
        self.shadow_claims = Counter(
            "clipbank_shadow_claims",
            "images a version in shadow would take, per route they take now",
            ["task", "taken_from"],
            registry=r,
        )
        self.shadow_score = Histogram(
            "clipbank_shadow_score",
            "selector scores of a version in shadow",
            ["task"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )

    def watch_cache(self, cache: TextCache) -> None:
        """Text-embedding cache figures, read at scrape time."""
        for name, doc, read in (
            ("entries", "entries in the text-embedding cache", lambda: len(cache)),
            ("bytes", "bytes held by the text-embedding cache", lambda: cache.bytes_held),
            ("hits", "text-embedding cache hits since start", lambda: cache.hits),
            ("misses", "text-embedding cache misses since start", lambda: cache.misses),
        ):
            Gauge(f"clipbank_text_cache_{name}", doc, registry=self.registry).set_function(read)

    def watch_health(
        self, ready: Callable[[], bool], store_error: Callable[[], bool], store_read_only: Callable[[], bool]
    ) -> None:
        """Gauges read at each scrape: /readyz's 200 and a store the server cannot read (it then serves its last
        bank, and /readyz still says 200 with status degraded; 503 if it never read one): neither showed in the
        metrics; and a store folder it cannot write (an SRE's: nothing to alert on before a change failed)."""
        Gauge(
            "clipbank_store_read_only",
            "1 while this server cannot write its store folder (it serves; every change is refused), else 0",
            registry=self.registry,
        ).set_function(lambda: float(store_read_only()))
        Gauge(
            "clipbank_ready", "1 once loaded and warmed up (/readyz 200), else 0", registry=self.registry
        ).set_function(lambda: float(ready()))
        Gauge(
            "clipbank_store_error",
            "1 while the store's index cannot be read (serving the last bank; changes refused), else 0",
            registry=self.registry,
        ).set_function(lambda: float(store_error()))

    def observe_backbone(self, described: dict[str, Any], runtime: str) -> None:
        """`clipbank_backbone_info{arch, pretrained, fingerprint, runtime} 1`: which backbone a server serves, for
        a dashboard and for an alert on servers of one store disagreeing (an outside check found it nowhere but
        /readyz)."""
        info = {k: str(described.get(k)) for k in ("arch", "pretrained")}
        info.update(fingerprint=str(described.get("fingerprint"))[:12], runtime=runtime)
        if self._backbone is None:  # once per registry (a second one is a duplicate series)
            self._backbone = Info("clipbank_backbone", "the backbone this server serves", registry=self.registry)
        self._backbone.info(info)

    def watch_reservoir(self, size, nbytes) -> None:
        """The unclaimed-traffic reservoir's figures, read at scrape time."""
        Gauge(
            "clipbank_unclaimed_reservoir_images", "embeddings of unclaimed images held", registry=self.registry
        ).set_function(size)
        Gauge(
            "clipbank_unclaimed_reservoir_bytes", "bytes the unclaimed reservoir holds (fixed)", registry=self.registry
        ).set_function(nbytes)

    def observe_bank(self, bank: BankSnapshot, seconds: float | None = None) -> None:
        self.generation.set(bank.generation)
        self.bank_bytes.set(bank_bytes(bank))
        self.bank_tasks.set(len(bank.tasks))
        self.degraded.set(len(bank.degraded))
        self.task_degraded.clear()  # only the tasks degraded now
        for task in bank.degraded:
            self.task_degraded.labels(task=task).set(1)
        if seconds is not None:
            self.swap_seconds.observe(seconds)

    def render(self) -> bytes:
        """The text exposition. With `replica` set (Ray Serve), every sample carries `replica="<id>"`: behind Ray's
        proxy a scrape reaches any one replica, and the label is what tells their series apart. A single process
        leaves it out, as Prometheus' own `instance` label names the target."""
        return generate_latest(self.registry if self.replica is None else _Labelled(self.registry, self.replica))


class _Labelled:
    """A collector that yields the registry's metrics with one more label on every sample."""

    def __init__(self, registry: CollectorRegistry, replica: str) -> None:
        self.registry, self.replica = registry, replica

    def collect(self):
        for metric in self.registry.collect():
            samples = [s._replace(labels={**s.labels, "replica": self.replica}) for s in metric.samples]
            metric.samples = samples
            yield metric


def bank_bytes(bank: BankSnapshot) -> int:
    """Tensor bytes the bank holds beyond the backbone: experts, routers, selectors."""
    routers = sum(w.numel() * w.element_size() for t in bank.tasks for ws in t.router.weights.values() for w in ws)
    selectors = sum(v.numel() * v.element_size() for t in bank.tasks for v in t.selector.tensors().values())
    return bank.expert_bytes() + routers + selectors

"""The server's life: the Service object (backbone, bank, batcher, admin token), start-up, polling, shutdown."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from PIL import PngImagePlugin

from model_store.backbone import Backbone, load_backbone
from model_store.errors import ClipbankError
from model_store.gate import Gate, GateLimits
from model_store.inference import ZERO_SHOT, ClassifyItem, TextCache, classify_batch
from model_store.reference import find_reference
from model_store.store import open_store
from model_store.store_index import INDEX_FORMAT

from .admin_token import on_a_terminal, resolve_admin_token
from .batching import Batcher
from .config import ServeConfig
from .errors import NotReady
from .images import NumpyPreprocess
from .insights import ReservoirConfig
from .memory import release_free_memory
from .metrics import Metrics
from .registry import Registry
from .request_ids import printed_line
from .steps import StepBudget
from .threads import compute_threads
from .watch import TrafficWatch
from .workers import DecodeWorkers

log = logging.getLogger("clipbank.service")
ANNOUNCE_SECONDS = 10.0  # how long POST /tasks?wait=all waits for the other replicas
PNG_TEXT_BYTES = 256 * 1024  # Pillow's caps on PNG text chunks (its defaults: 1 MB per chunk, 64 MB in all)


class Service:
    """The app's state: settings, metrics, and once loaded, the registry and the batcher."""

    def __init__(self, config: ServeConfig, backbone: Backbone | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.admin_token: str | None = config.admin_token  # resolved at start-up when not set
        self.backbone = backbone
        self.registry: Registry | None = None
        self.batcher: Batcher | None = None
        self.error: str | None = None
        self.ready = asyncio.Event()
        self.failed = asyncio.Event()
        self.decoders = DecodeWorkers()
        self.preprocess: Callable[[Any], Any] | None = None  # image -> [3, H, W], in the decode threads
        self.threads: int | None = None  # of each forward pass, once loading has chosen them
        self.watch = TrafficWatch(self.metrics)
        self.metrics.watch_health(
            lambda: self.ready.is_set() and self.registry is not None and self.registry.store_read,
            lambda: self.registry is not None and self.registry.store_error is not None,
            lambda: self.registry is not None and store_writable(self.registry.store) is False,
        )
        self.metrics.max_queue_images.set(config.max_queue_images)
        self.replica = f"{socket.gethostname()}-{os.getpid()}"  # X-Clipbank-Replica; Ray Serve sets its own id
        self.peers: Any = None  # the other replicas to tell of a change (service/ray_engine.py), if any
        self._announcing: set[asyncio.Task] = set()

    async def announce(self, generation: int, wait: bool) -> dict[str, Any]:
        """Tell the other replicas (if any) that the store is at `generation`. With `wait`, return once each has
        answered or ANNOUNCE_SECONDS passed: {replica: the generation it serves, or why it did not answer};
        without, best effort in the background. A single server answers for itself."""
        registry = self.require_ready()
        if self.peers is None:
            return {self.replica: registry.bank.generation}
        task = asyncio.create_task(self.peers.announce(generation, ANNOUNCE_SECONDS))
        if wait:
            try:
                return await task
            except Exception as e:  # the change is stored either way: report who could not be asked
                log.warning("asking the other replicas failed: %s", e)
                said = f"not asked: {type(e).__name__}"
                if isinstance(e, TimeoutError | asyncio.TimeoutError):  # Ray's GetTimeoutError too; it names none
                    said = (
                        f"not all answered within {ANNOUNCE_SECONDS:g} s ({type(e).__name__}): one is stuck, "
                        "starting, or still reading a slow store"
                    )
                return {self.replica: registry.bank.generation, "others": said}
        self._announcing.add(task)
        task.add_done_callback(self._announced)
        return {self.replica: registry.bank.generation}

    def _announced(self, task: asyncio.Task) -> None:
        self._announcing.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the replicas' polls catch up anyway
            log.warning("telling the other replicas of a change failed: %s", task.exception())

    def load(self) -> None:
        """Backbone, store, bank, warm-up: everything before /readyz turns 200 (runs off the event loop). The
        compute thread starts first and does the torch part, as it later does each change's trial run and gate
        (`Batcher.run` says why one thread)."""
        PngImagePlugin.MAX_TEXT_CHUNK = PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_BYTES
        cache = TextCache(self.config.text_cache_size, self.config.text_cache_mb * 1024 * 1024)
        limits = self.config.limits
        batcher = Batcher(
            lambda: self.registry.bank,
            self.config.max_batch,
            self.config.max_wait_ms,
            cache,
            self.metrics,
            self.config.max_queue_images,
            StepBudget(max_request_prompts=limits.max_request_prompts),
            watch=self.watch,
        )
        batcher.start()
        try:
            batcher.run(self._load_models, cache)
        except BaseException:
            batcher.stop()
            raise
        self.registry.run_torch = batcher.run
        self.preprocess = NumpyPreprocess.of(self.backbone.preprocess)  # the decode threads run no torch
        self.metrics.watch_cache(cache)
        runtime = self.backbone.frozen.name if self.backbone.frozen is not None else "torch"
        self.metrics.observe_backbone(self.backbone.describe(), runtime)
        self.batcher = batcher
        # What start-up made lives as long as the server: keep it out of the collector's full passes, whose
        # time grows with the heap and showed as periodic latency spikes under load.
        gc.collect()
        gc.freeze()

    def _load_models(self, cache: TextCache) -> None:
        """The torch part of start-up, on the compute thread: backbone, ONNX export, bank, warm-up."""
        if self.backbone is None:
            self.backbone = load_backbone(self.config.backbone, self.config.device)
        self.threads = compute_threads(self.config.threads, torch.get_num_threads(), self.backbone.narrow)
        torch.set_num_threads(self.threads)  # before any pass: also what the ONNX Runtime session is given
        self.backbone = self._frozen_runtime().with_autocast(self.config.autocast)
        if self.config.autocast != "off":
            self._say_autocast()
        reference, cfg = self._reference(), self.config
        gate = Gate(GateLimits(cfg.gate_max_stolen, cfg.gate_max_zero_shot), reference)
        monitor = ReservoirConfig(
            cfg.unclaimed_capacity, cfg.unclaimed_retention_seconds, cfg.unclaimed_bin_seconds, cfg.unclaimed_thumbnails
        )
        self.watch.start_monitor(monitor, self.backbone, reference)
        registry = Registry(open_store(cfg.store), self.backbone, self.metrics, cache, gate, self.watch.swapped)
        bank = registry.load()
        if registry.store_error is None:  # read again only when it could be: a hanging S3 endpoint cost 30 s more
            _say_store(registry.store)
        self.registry = registry  # published once it has a bank: /healthz reads it while this runs
        warm = torch.zeros(1, 3, self.backbone.image_size, self.backbone.image_size)
        items = [ClassifyItem(warm, ("a", "b"), ZERO_SHOT)] + [ClassifyItem(warm, None, t) for t in bank.task_names]
        # First-call costs, and every task's class embeddings into the cache.
        for item, out in zip(items, classify_batch(bank, items, cache), strict=True):
            if isinstance(out, Exception):
                log.error("warm-up of %s failed: %s: %s", item.task, type(out).__name__, out)

    def _reference(self) -> torch.Tensor | None:
        """The backbone's reference set of generic images (the gate's and the unclaimed monitor's background), if
        there is one: without it, what a task would take from zero-shot is not measured, and the report says so."""
        try:
            reference = find_reference(self.backbone)
        except ClipbankError as e:
            log.warning("no reference set for the gate: %s", e)
            reference = None
        if reference is None:
            log.info("no reference set for %s: the gate does not measure zero-shot capture", self.backbone.ref.text)
        return reference.embeddings if reference is not None else None

    def _frozen_runtime(self) -> Backbone:
        """This server's own backbone object, sharing the given one's model, with the runtime of its frozen passes.

        The given object is never changed (it may be shared with another app), and the returned one is not changed
        once it is returned: every bank snapshot holds it. `onnx` fails the start if it cannot be used; `auto` uses
        it on CPU and falls back to torch, saying why.
        """
        shared, wanted = self.backbone, self.config.frozen_runtime
        if wanted == "torch" or (wanted == "auto" and shared.device.type != "cpu"):
            return shared.with_frozen()  # PyTorch, whatever runtime the shared object has
        if shared.frozen.name == (wanted if wanted != "auto" else "onnx"):  # set up by whoever loaded the backbone
            return shared.with_frozen(shared.frozen)
        from model_store.onnx_runtime import with_onnx_runtime

        try:
            return with_onnx_runtime(shared, self.config.onnx_cache or None, int8=wanted == "onnx-int8")[0]
        except Exception as e:  # export, cache, file system and ONNX Runtime errors alike
            if wanted != "auto":
                raise
            # our own errors say what and where in a line; anything else keeps its traceback for a bug report
            trace = None if isinstance(e, (ClipbankError, OSError)) else e
            log.warning("frozen passes stay in PyTorch: %s: %s", type(e).__name__, e, exc_info=trace)
        return shared.with_frozen()

    def _say_autocast(self) -> None:
        """Said at start, as nothing else shows it: on CPU it is not what it is for, and ONNX passes ignore it."""
        backbone, cpu = self.backbone, self.backbone.device.type != "cuda"
        where = " on CPU (meant for a GPU: here slower and less exact)" if cpu else ""
        frozen = (
            "" if backbone.frozen.name == "torch" else f"; the frozen passes run in {backbone.frozen.name}, without it"
        )
        (log.warning if cpu else log.info)("autocast %s for the PyTorch passes%s%s", backbone.autocast, where, frozen)

    def require_ready(self) -> Registry:
        if not self.ready.is_set() or self.registry is None:
            raise NotReady(self.error or "the server is still loading the backbone and the bank")
        return self.registry

    def health(self) -> dict[str, Any]:
        """What /healthz and /readyz report beyond the status: tasks left out of the bank, store problems, and
        whether a store folder can take a change (a read-only mount serves, but refuses every change)."""
        registry = self.registry
        if registry is None:
            return {"degraded": {}, "store_error": None}
        return {
            "degraded": dict(registry.bank.degraded),
            "store_error": registry.store_error,
            "store_writable": store_writable(registry.store),
        }


def store_writable(store: Any) -> bool | None:
    """Whether this server may write a store folder (False on a read-only mount, or without permission); None for
    an object store, whose write permissions show only when a change is tried."""
    root = getattr(store, "root", None)
    if root is None:
        return None
    blobs = os.path.join(root, "blobs")  # a restore that skipped its chown leaves the folder writable, not blobs/
    return os.access(root, os.W_OK) and (not os.path.isdir(blobs) or os.access(blobs, os.W_OK))


def _say_store(store: Any) -> None:
    """Which store this server serves, and what of it cannot be changed, said at start: an outside check's typo
    in --store served an empty bank, ready, with no line naming the store; a store a newer release wrote is
    served from, but every change to it is refused (`store_too_new`); a read-only folder refused every change."""
    try:
        index = store.index()
    except (ClipbankError, OSError):  # the registry says why
        return
    active = sum(1 for t in index.tasks.values() if t.active)
    if index.generation == 0 and not index.tasks:
        log.warning("store %s is new and empty: no task is served (is that the store you meant?)", store.location)
    else:
        log.info("store %s: %d active task(s), generation %d", store.location, active, index.generation)
    if store_writable(store) is False:
        log.warning("store %s is read-only for this server: it serves, but every change is refused", store.location)
    written = index.format
    if written > INDEX_FORMAT:
        log.warning(
            "the store was written by a newer clipbank (index format %d; this release reads up to %d): serving from "
            "it, but every change is refused (store_too_new) until this server is upgraded",
            written,
            INDEX_FORMAT,
        )


async def _poll_store(service: Service) -> None:
    """Pick up changes other servers made to a shared store, and return freed heap memory to the system."""
    while True:
        await asyncio.sleep(service.config.poll_seconds)
        try:
            await run_in_threadpool(service.registry.refresh)
            await run_in_threadpool(release_free_memory)  # what requests and uploads freed since the last poll
        except Exception:  # keep polling; the store may come back
            log.exception("polling the store failed")


def lifespan(on_fatal: Callable[[str], None] | None, wait_ready: bool = False):
    """Start-up in the background (so /healthz answers at once), polling while ready, draining at shutdown.

    `wait_ready`: start-up completes only once the bank is loaded, and fails if loading does (Ray Serve reports a
    replica ready when its app's start-up completes)."""

    @asynccontextmanager
    async def run(app: FastAPI):
        service: Service = app.state.service
        if service.admin_token is None or service.admin_token == service.config.admin_token:  # set: checked too
            service.admin_token, origin = resolve_admin_token(service.config)
            shown = "(not shown)"
            if origin.startswith("generated"):  # a log (journald, docker logs) is read by more than its mode-600 file
                if on_a_terminal():
                    shown = service.admin_token
                elif "not saved" in origin:  # no file holds it (a full or read-only store): say the way out
                    shown = "not shown in a log, and no file holds it: set CLIPBANK_ADMIN_TOKEN to use /tasks"
                else:
                    shown = "not shown in a log, read it from the file"
            if origin != "set":
                line = printed_line(f"admin token {origin}: {shown}", service.config.log_format)
                print(line, file=sys.stderr, flush=True)
        poller: asyncio.Task | None = None

        async def start() -> None:
            nonlocal poller
            try:
                await run_in_threadpool(service.load)
            except Exception as e:  # reported by /readyz and on_fatal
                known = isinstance(e, ClipbankError)  # a backbone that cannot load, say: its message says it all
                service.error = f"start-up failed: {e.code if known else type(e).__name__}: {e}"
                if not known or on_fatal is None:  # `clipbank serve` ends with the message as its last line
                    log.error("%s", service.error, exc_info=None if known else e)
                service.failed.set()
                if on_fatal is not None:
                    on_fatal(service.error)
                return
            service.ready.set()
            poller = asyncio.create_task(_poll_store(service))
            log.info("ready (%d threads per pass): %s", service.threads, json.dumps(service.registry.bank.describe()))

        starter = asyncio.create_task(start())
        try:
            if wait_ready:
                await asyncio.shield(starter)
                if service.error is not None:
                    raise RuntimeError(service.error)
            yield
        finally:
            starter.cancel()
            if poller is not None:
                poller.cancel()
            if service.batcher is not None:
                await run_in_threadpool(service.batcher.stop)
            service.decoders.shutdown()
            service.watch.stop()
            gc.unfreeze()  # an app inside a longer-lived process (tests) gives its objects back

    return run

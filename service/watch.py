"""What the server watches in live traffic after each batch's image passes, just before its answers: what versions
in shadow would do (`service.shadow`), and the images no task claimed (`service.insights`). It sees only the
requests answered with results (a refused request's client may send its images again). It costs a batch well
under a millisecond, plus the thumbnails when the operator opts in to them (docs/safety.md), and can never fail
a request."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from model_store.backbone import Backbone
from model_store.bank import BankSnapshot
from model_store.inference import AUTO, ClassifyItem, ImagePasses, task_scores
from model_store.shadow import auto_rows, auto_spans, observe

from .clusters import MIN_BACKGROUND, find_clusters, typical_members
from .errors import Overloaded
from .insights import ReservoirConfig, UnclaimedReservoir
from .metrics import Metrics
from .shadow import ShadowMonitor

log = logging.getLogger("clipbank.service")


@dataclass(frozen=True)
class WatchedRequest:
    """One request's share of a batch's image passes, in the fields `TrafficWatch` reads of `ImagePasses`."""

    bank: BankSnapshot
    items: Sequence[ClassifyItem]
    spans: dict[int, tuple[int, int]]
    out: list
    frozen: torch.Tensor
    all_scores: torch.Tensor
    tasks: torch.Tensor
    images: torch.Tensor | None  # only when the reservoir keeps thumbnails
    moved: torch.Tensor  # sent to zero-shot by label-aware routing, though a selector claimed them


class TrafficWatch:
    """Called by the compute thread with each batch's completed image passes, and told of every swap."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.shadows = ShadowMonitor(metrics)
        self.reservoir: UnclaimedReservoir | None = None  # set once the backbone's dimension is known
        self.background: np.ndarray | None = None  # the backbone's reference set: generic images
        self._pixels: tuple[torch.Tensor, torch.Tensor] | None = None  # the preprocessing's mean and std
        self._clustering = threading.Lock()
        self._turn = asyncio.Lock()  # the requests for a clustering wait their turn on the event loop, not in threads
        self._failed: set[str] = set()  # kinds of failure already logged with a traceback
        self._stop = threading.Event()

    def start_monitor(self, config: ReservoirConfig, backbone: Backbone, background: torch.Tensor | None) -> None:
        """Allocate the unclaimed reservoir (all of its memory, now) and read its gauges at scrape time."""
        self.reservoir = UnclaimedReservoir(config, backbone.embed_dim)
        cfg = open_clip.get_model_preprocess_cfg(backbone.model)
        self._pixels = tuple(torch.tensor(cfg[k], dtype=torch.float32).view(1, -1, 1, 1) for k in ("mean", "std"))
        self.background = None if background is None else background.detach().float().cpu().numpy()
        if self.background is not None and len(self.background) < MIN_BACKGROUND:
            log.warning(
                "the reference set has %d embeddings, fewer than the %d the unclaimed monitor needs: it clusters "
                "without it (`clipbank reference build` makes a larger one)",
                len(self.background),
                MIN_BACKGROUND,
            )
            self.background = None
        self.metrics.watch_reservoir(lambda: len(self.reservoir), lambda: self.reservoir.nbytes)
        if config.thumbnail:  # users' images: wiped on time even when no traffic comes to trigger it
            every = min(60.0, config.retention_seconds / 10)
            threading.Thread(target=self._expire_every, args=(every,), name="clipbank-expire", daemon=True).start()

    def _expire_every(self, seconds: float) -> None:
        while not self._stop.wait(seconds):
            self.reservoir.expire()

    def stop(self) -> None:
        self._stop.set()

    def swapped(self, bank: BankSnapshot) -> None:
        self.shadows.follow(bank.shadows, {t.name: t.bundle_id for t in bank.tasks}, bank.degraded)

    def __call__(self, passes: ImagePasses | WatchedRequest, requests: Collection[int] | None = None) -> None:
        """Record a batch's image passes: of `requests` (indices into the batch), or of all of its requests."""
        if passes.frozen is None or passes.all_scores is None:
            return
        chosen = passes.spans if requests is None else {k: passes.spans[k] for k in requests if k in passes.spans}
        spans = auto_spans(passes.items, chosen, passes.out)
        if not spans:
            return
        rows = auto_rows(spans)
        if passes.bank.shadows:
            try:  # each part on its own: a failing shadow costs neither the reservoir nor the answers
                self.shadows.record(observe(passes.bank, passes.frozen, passes.all_scores, passes.tasks, spans, rows))
            except Exception:
                self._log_once("scoring the versions in shadow failed")
        if self.reservoir is not None and self.reservoir.enabled:
            unclaimed, thumbs = rows[passes.tasks[rows] < 0], None
            if self.reservoir.config.thumbnail:
                try:  # on its own: without thumbnails the counts and embeddings still go in
                    thumbs = self._thumbnails(passes.images[unclaimed.to(passes.images.device)])
                except Exception:
                    self._log_once("making thumbnails of unclaimed images failed")
            try:
                feats = passes.frozen[unclaimed.to(passes.frozen.device)].float().cpu().numpy()
                moved = passes.moved[unclaimed.to(passes.moved.device)].numpy()
                self.reservoir.record(len(rows), feats, thumbnails=thumbs, moved=moved)
            except Exception:
                self._log_once("recording unclaimed images failed")

    def keep(self, passes: ImagePasses, k: int) -> WatchedRequest | None:
        """What `__call__` needs of request `k`'s image passes, copied (not the whole batch's tensors), for a
        request answered later: one whose new label sets are encoded a step at a time."""
        if passes.frozen is None or passes.all_scores is None or k not in passes.spans or passes.items[k].task != AUTO:
            return None  # nothing to watch: only auto-routed traffic is
        a, b = passes.spans[k]
        images = None
        if self.reservoir is not None and self.reservoir.config.thumbnail and passes.images is not None:
            images = passes.images[a:b].clone()
        return WatchedRequest(
            passes.bank,
            [passes.items[k]],
            {0: (0, b - a)},
            [None],
            passes.frozen[a:b].clone(),
            passes.all_scores[a:b].clone(),
            passes.tasks[a:b].clone(),
            images,
            passes.moved[a:b].clone(),
        )

    def _thumbnails(self, images: torch.Tensor) -> np.ndarray:
        """The model's input images (normalised, square) as RGB thumbnails [n, side, side, 3] uint8."""
        side, (mean, std) = self.reservoir.config.thumbnail, self._pixels
        with torch.inference_mode():  # resized where the images are: a GPU sends the host thumbnails, not inputs
            x = images.float() * std.to(images.device) + mean.to(images.device)
            if x.shape[-1] != side or x.shape[-2] != side:
                x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
            return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def _log_once(self, what: str) -> None:
        """The first failure of a kind with its traceback, then a line each time (not a traceback per batch)."""
        if what in self._failed:
            log.error("%s again", what)
        else:
            self._failed.add(what)
            log.exception(what)

    def unclaimed(
        self, bank: BankSnapshot, min_share: float, min_size: int, max_clusters: int, examples: int = 0
    ) -> dict[str, Any]:
        """`GET /insights/unclaimed`: the reservoir's window, and its clusters with each one's nearest task (and up
        to `examples` thumbnails of each, when the reservoir keeps them). One computation at a time (another gets
        503 overloaded: `in_turn` makes requests wait for theirs)."""
        reservoir = self.reservoir
        if reservoir is None or not reservoir.enabled:
            return {"enabled": False, "reservoir": None, "clusters": []}
        if not self._clustering.acquire(blocking=False):
            raise Overloaded("the unclaimed traffic is being clustered for another request: retry shortly")
        try:
            snap = reservoir.snapshot()
            clusters = find_clusters(snap, _scorer(bank), min_share, min_size, max_clusters, self.background)
            shown = _examples(reservoir, snap, clusters, examples)
        finally:
            self._clustering.release()
        auto, unclaimed = snap.auto_images, snap.unclaimed
        return {
            "enabled": True,
            "reservoir": {
                "embeddings": len(snap),
                "capacity": reservoir.config.capacity,
                "bytes": reservoir.nbytes,
                "retention_seconds": reservoir.config.retention_seconds,
                "bin_seconds": reservoir.config.bin_seconds,
                "window_start": snap.start,
                "auto_images": auto,
                "unclaimed": unclaimed,
                "unclaimed_share": unclaimed / auto if auto else None,
                "background": None if self.background is None else len(self.background),
                "thumbnail": reservoir.config.thumbnail,
            },
            "clusters": [{**c.to_json(), "examples": e} for c, e in zip(clusters, shown, strict=True)],
        }


async def in_turn(watch: TrafficWatch, bank: BankSnapshot, *args: Any) -> dict[str, Any]:
    """`watch.unclaimed(bank, *args)` in a worker thread once the clusterings asked before it are done: a request
    waits on the event loop, up to CLUSTERING_WAIT_SECONDS, then gets 503 overloaded (it got that at once, and an
    outside check's dashboard beside one CLI call tripped the `overloaded` alert; waiting in a worker thread held
    one of the pool that /classify's decoding and the store's polls use, the review)."""
    from starlette.concurrency import run_in_threadpool

    try:
        await asyncio.wait_for(watch._turn.acquire(), CLUSTERING_WAIT_SECONDS)
    except TimeoutError:
        raise Overloaded("the unclaimed traffic is being clustered for other requests: retry shortly") from None
    try:
        return await run_in_threadpool(watch.unclaimed, bank, *args)
    finally:
        watch._turn.release()


CLUSTERING_WAIT_SECONDS = 30.0  # a clustering of a full reservoir takes a few seconds (2.2 s for 1,800 here)
MAX_EXAMPLES = 256  # thumbnails in one answer, at most (biggest clusters first): 128-pixel PNGs, ~50 KB each


def _examples(reservoir: UnclaimedReservoir, snap, clusters: list, per_cluster: int) -> list[list[str]]:
    """Per cluster, up to `per_cluster` thumbnails of its most typical members as PNG data URIs (none when the
    reservoir keeps no thumbnails; at most MAX_EXAMPLES in all). A member whose slot was reused or expired since
    the snapshot is skipped: its thumbnail is another image's, or gone."""
    out, left = [], MAX_EXAMPLES if reservoir.config.thumbnail else 0
    for c in clusters:
        rows = typical_members(snap, c, min(per_cluster, left))
        found = reservoir.thumbnails(snap.slots[rows], snap.stamps[rows]) if len(rows) else []
        thumbs = [t for t in found if t is not None]
        out.append([_png(t) for t in thumbs])
        left -= len(rows)
    return out


def _png(thumbnail: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(thumbnail, "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _scorer(bank: BankSnapshot):
    """Embeddings [n, D] -> (active task names, their selector scores [n, T]) on `bank`."""

    def score_tasks(x: np.ndarray) -> tuple[list[str], np.ndarray]:
        feats = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(bank.backbone.device)
        with torch.inference_mode():
            return list(bank.task_names), task_scores(bank, feats).numpy()

    return score_tasks

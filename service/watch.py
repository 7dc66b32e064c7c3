"""What the server watches in live traffic after each batch's image passes, just before its answers: what versions
in shadow would do (`service.shadow`), and the images no task claimed (`service.insights`). It costs a batch
well under a millisecond (docs/safety.md) and can never fail a request."""

from __future__ import annotations

import base64
import io
import logging
import threading
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from model_store.backbone import Backbone
from model_store.bank import BankSnapshot
from model_store.inference import ImagePasses, task_scores
from model_store.shadow import auto_rows, auto_spans, observe

from .errors import Overloaded
from .insights import ReservoirConfig, UnclaimedReservoir, cluster_examples, find_clusters
from .metrics import Metrics
from .shadow import ShadowMonitor

log = logging.getLogger("clipbank.service")


class TrafficWatch:
    """Called by the compute thread with each batch's completed image passes, and told of every swap."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.shadows = ShadowMonitor(metrics)
        self.reservoir: UnclaimedReservoir | None = None  # set once the backbone's dimension is known
        self.background: np.ndarray | None = None  # the backbone's reference set: generic images
        self._pixels: tuple[torch.Tensor, torch.Tensor] | None = None  # the preprocessing's mean and std
        self._clustering = threading.Lock()
        self._failed: set[str] = set()  # kinds of failure already logged with a traceback

    def start_monitor(self, config: ReservoirConfig, backbone: Backbone, background: torch.Tensor | None) -> None:
        """Allocate the unclaimed reservoir (all of its memory, now) and read its gauges at scrape time."""
        self.reservoir = UnclaimedReservoir(config, backbone.embed_dim)
        cfg = open_clip.get_model_preprocess_cfg(backbone.model)
        self._pixels = tuple(torch.tensor(cfg[k], dtype=torch.float32).view(1, -1, 1, 1) for k in ("mean", "std"))
        self.background = None if background is None else background.detach().float().cpu().numpy()
        self.metrics.watch_reservoir(lambda: len(self.reservoir), lambda: self.reservoir.nbytes)

    def swapped(self, bank: BankSnapshot) -> None:
        self.shadows.follow(bank.shadows)

    def __call__(self, passes: ImagePasses) -> None:
        if passes.frozen is None or passes.all_scores is None:
            return
        spans = auto_spans(passes.items, passes.spans, passes.out)
        if not spans:
            return
        rows = auto_rows(spans)
        if passes.bank.shadows:
            try:  # each part on its own: a failing shadow costs neither the reservoir nor the answers
                self.shadows.record(observe(passes.bank, passes.frozen, passes.all_scores, passes.tasks, spans, rows))
            except Exception:
                self._log_once("scoring the versions in shadow failed")
        if self.reservoir is not None and self.reservoir.enabled:
            try:
                unclaimed = rows[passes.tasks[rows] < 0].to(passes.frozen.device)
                thumbs = self._thumbnails(passes.images[unclaimed]) if self.reservoir.config.thumbnail else None
                self.reservoir.record(len(rows), passes.frozen[unclaimed].float().cpu().numpy(), thumbnails=thumbs)
            except Exception:
                self._log_once("recording unclaimed images failed")

    def _thumbnails(self, images: torch.Tensor) -> np.ndarray:
        """The model's input images (normalised, square) as RGB thumbnails [n, side, side, 3] uint8."""
        side, (mean, std) = self.reservoir.config.thumbnail, self._pixels
        with torch.inference_mode():
            x = images.float().cpu() * std + mean
            if x.shape[-1] != side or x.shape[-2] != side:
                x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
            return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

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
        to `examples` thumbnails of each, when the reservoir keeps them). One computation at a time (another
        request meanwhile gets 503 overloaded)."""
        reservoir = self.reservoir
        if reservoir is None or not reservoir.enabled:
            return {"enabled": False, "reservoir": None, "clusters": []}
        if not self._clustering.acquire(blocking=False):
            raise Overloaded("the unclaimed traffic is being clustered for another request: retry shortly")
        try:
            snap = reservoir.snapshot()
            clusters = find_clusters(snap, _scorer(bank), min_share, min_size, max_clusters, self.background)
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
                "window_start": snap.bins[0].start if snap.bins else None,
                "auto_images": auto,
                "unclaimed": unclaimed,
                "unclaimed_share": unclaimed / auto if auto else None,
                "background": None if self.background is None else len(self.background),
                "thumbnail": reservoir.config.thumbnail,
            },
            "clusters": [{**c.to_json(), "examples": _pngs(cluster_examples(snap, c, examples))} for c in clusters],
        }


def _pngs(thumbnails: np.ndarray) -> list[str]:
    """Each thumbnail as a data URI of a PNG."""
    out = []
    for t in thumbnails:
        buf = io.BytesIO()
        Image.fromarray(t, "RGB").save(buf, format="PNG")
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def _scorer(bank: BankSnapshot):
    """Embeddings [n, D] -> (active task names, their selector scores [n, T]) on `bank`."""

    def score_tasks(x: np.ndarray) -> tuple[list[str], np.ndarray]:
        feats = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(bank.backbone.device)
        with torch.inference_mode():
            return list(bank.task_names), task_scores(bank, feats).numpy()

    return score_tasks

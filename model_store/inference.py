"""Classification over a bank snapshot: frozen pass, per-image selection, adapted pass, cached text embeddings."""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .bank import BankSnapshot
from .errors import InvalidRequest
from .moe_clip import encode_image, encode_text
from .selector import score

ZERO_SHOT = "zero-shot"
AUTO = "auto"
ROUTE_MODES = ("per-image", "per-request")
ZERO_SHOT_TEMPLATES = ("a photo of a {}.",)


@dataclass(frozen=True)
class ClassifyItem:
    """One request: preprocessed images [n, 3, H, W] and how to route and label them."""

    images: torch.Tensor
    labels: tuple[str, ...] | None = None
    task: str = AUTO  # auto | zero-shot | a task name
    route: str = "per-image"
    top_k: int | None = None


@dataclass(frozen=True)
class Route:
    task: str | None
    version: int | None = None
    bundle_id: str | None = None
    score: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class ImageResult:
    labels: list[tuple[str, float]]
    route: Route


class TextCache:
    """A thread-safe LRU of normalised text embeddings keyed by (bundle id or zero-shot, labels, templates).

    Bounded in entries and in bytes (tensor bytes plus the key's characters), whichever is reached first.
    """

    def __init__(self, maxsize: int = 1024, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self._data: OrderedDict[tuple, tuple[torch.Tensor, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.nbytes = 0

    def get_or_compute(self, key: tuple, compute) -> torch.Tensor:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key][0]
            self.misses += 1
        value = compute()
        size = value.numel() * value.element_size() + sum(len(s) for part in key[1:] for s in part)
        if size > self.max_bytes or self.maxsize == 0:
            return value
        with self._lock:
            if key not in self._data:
                self._data[key] = (value, size)
                self.nbytes += size
            while len(self._data) > self.maxsize or self.nbytes > self.max_bytes:
                self.nbytes -= self._data.popitem(last=False)[1][1]
        return value

    def __len__(self) -> int:
        return len(self._data)


TEXT_CHUNK = 256  # prompts per text forward pass, so a long label list never makes one huge batch


def text_embeddings(
    bank: BankSnapshot, task: int, labels: Sequence[str], templates: Sequence[str], cache: TextCache | None = None
) -> torch.Tensor:
    """Per label: encode with each template, normalise, average, renormalise. `task=-1` is the frozen tower."""
    key = (bank.tasks[task].bundle_id if task >= 0 else ZERO_SHOT, tuple(labels), tuple(templates))

    def compute() -> torch.Tensor:
        bb = bank.backbone
        prompts = [t.format(label) for t in templates for label in labels]
        tokens = bb.tokenizer(prompts).to(bb.device)
        parts = []
        with torch.inference_mode():
            for s in range(0, len(tokens), TEXT_CHUNK):
                chunk = tokens[s : s + TEXT_CHUNK]
                if task >= 0:
                    parts.append(encode_text(bb.model, chunk, bank.routing(torch.full((len(chunk),), task))))
                else:
                    parts.append(bb.frozen.text(chunk))
        emb = torch.cat(parts).view(len(templates), len(labels), -1).mean(0)
        return torch.nn.functional.normalize(emb, dim=-1)

    return compute() if cache is None else cache.get_or_compute(key, compute)


def task_scores(bank: BankSnapshot, feats: torch.Tensor) -> torch.Tensor:
    """Selector scores [n, T] (error / threshold) of every active task, for frozen embeddings [n, D]."""
    if not bank.tasks:
        return torch.empty(feats.shape[0], 0)
    return torch.stack([score(t.selector, feats).float().cpu() for t in bank.tasks], dim=1)


def select_tasks(bank: BankSnapshot, scores: torch.Tensor, item: ClassifyItem) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the task index (-1 = zero-shot) and its selector score (nan when not scored)."""
    n = scores.shape[0]
    if item.task not in (AUTO, ZERO_SHOT):
        t = bank.task_index(item.task)  # raises TaskNotFound
        return torch.full((n,), t, dtype=torch.long), scores[:, t]
    if item.task == ZERO_SHOT or not bank.tasks:
        return torch.full((n,), -1, dtype=torch.long), torch.full((n,), float("nan"))
    if item.route == "per-request":
        scores = scores.mean(0, keepdim=True).expand(n, -1)
    best, idx = scores.min(dim=1)
    return torch.where(best <= 1.0, idx, torch.full_like(idx, -1)), best


def _route_of(bank: BankSnapshot, t: int, s: float) -> Route:
    if t < 0:
        return Route(None, score=None if s != s else s)
    task = bank.tasks[t]
    return Route(task.name, task.version, task.bundle_id, s, task.selector.threshold)


def _item_results(
    bank: BankSnapshot,
    item: ClassifyItem,
    feats: torch.Tensor,
    tasks: torch.Tensor,
    scores: torch.Tensor,
    cache: TextCache | None,
) -> list[ImageResult]:
    scale = float(bank.backbone.model.logit_scale.exp())
    results = []
    for i in range(feats.shape[0]):
        t = int(tasks[i])
        if item.labels:
            labels = item.labels
            templates = bank.tasks[t].templates if t >= 0 else ZERO_SHOT_TEMPLATES
        elif t >= 0:
            labels, templates = bank.tasks[t].classes, bank.tasks[t].templates
        elif item.task == AUTO:  # no task claimed the image and there is nothing to choose among: say so
            results.append(ImageResult([], _route_of(bank, t, float(scores[i]))))
            continue
        else:
            raise InvalidRequest(
                "no labels given and the image routed to zero-shot CLIP, which has no classes of its "
                "own; send labels or pin a task"
            )
        text = text_embeddings(bank, t, labels, templates, cache)
        probs = torch.softmax(scale * feats[i] @ text.T, dim=-1).cpu()
        order = probs.argsort(descending=True)[: item.top_k or len(labels)]
        results.append(ImageResult([(labels[j], float(probs[j])) for j in order], _route_of(bank, t, float(scores[i]))))
    return results


def check_item(bank: BankSnapshot, item: ClassifyItem) -> InvalidRequest | None:
    """What is wrong with a request before any compute, or None."""
    size = bank.backbone.image_size
    if item.images.ndim != 4 or tuple(item.images.shape[1:]) != (3, size, size) or len(item.images) == 0:
        return InvalidRequest(f"images must be a [n >= 1, 3, {size}, {size}] tensor, got {tuple(item.images.shape)}")
    if item.route not in ROUTE_MODES:
        return InvalidRequest(f"route must be one of {', '.join(ROUTE_MODES)}, got {item.route!r}")
    if item.top_k is not None and item.top_k < 1:
        return InvalidRequest(f"top_k must be >= 1, got {item.top_k}")
    if item.labels is not None and len(set(item.labels)) != len(item.labels):
        return InvalidRequest("labels must be distinct")
    return None


def classify_batch(
    bank: BankSnapshot, items: Sequence[ClassifyItem], cache: TextCache | None = None
) -> list[list[ImageResult] | Exception]:
    """Answer several requests with one frozen pass and one adapted pass that mixes tasks.

    A request that cannot be answered gets its exception in its place; the others are unaffected.
    """
    bb = bank.backbone
    cache = cache if cache is not None else TextCache()  # at least one text pass per label set in this batch
    out: list = [check_item(bank, it) for it in items]
    live = [k for k, e in enumerate(out) if e is None]
    if not live:
        return out
    sizes = [len(items[k].images) for k in live]
    images = torch.cat([items[k].images for k in live]).to(bb.device)
    frozen = bb.frozen.image(images)
    tasks = torch.full((len(images),), -1, dtype=torch.long)
    scores = torch.full((len(images),), float("nan"))
    spans = [(k, s - n, s) for k, n, s in zip(live, sizes, itertools.accumulate(sizes))]
    all_scores = task_scores(bank, frozen)  # once for the whole batch
    for k, a, b in spans:
        try:
            tasks[a:b], scores[a:b] = select_tasks(bank, all_scores[a:b], items[k])
        except Exception as e:  # noqa: BLE001 - reported per request
            out[k] = e
    feats = frozen.clone()
    routed = (tasks >= 0).nonzero(as_tuple=True)[0].to(bb.device)
    if len(routed):
        with torch.inference_mode():
            feats[routed] = encode_image(bb.model, images[routed], bank.routing(tasks[routed.cpu()]))
    for k, a, b in spans:
        if out[k] is None:
            try:
                out[k] = _item_results(bank, items[k], feats[a:b], tasks[a:b], scores[a:b], cache)
            except Exception as e:  # noqa: BLE001 - reported per request
                out[k] = e
    return out

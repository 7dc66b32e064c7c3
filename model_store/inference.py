"""Classification over a bank snapshot: frozen pass, per-image selection, adapted pass, cached text embeddings."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from .bank import BankSnapshot
from .errors import InvalidRequest
from .labels import MAX_TEMPLATES, label_key, shown, template_ok
from .modes import AUTO, PER_IMAGE, PER_REQUEST, ROUTE_MODES, ZERO_SHOT
from .moe_clip import encode_image, encode_image_from, image_tokens
from .settings import field_type_problems
from .text import TextCache, prompt_texts, text_embeddings, text_key

ZERO_SHOT_TEMPLATES = ("a photo of a {}.",)


@dataclass(frozen=True)
class ClassifyItem:
    """One request: preprocessed images [n, 3, H, W] and how to route and label them."""

    images: torch.Tensor
    labels: tuple[str, ...] | None = None
    task: str = AUTO  # auto | zero-shot | a task name
    route: str = PER_IMAGE
    top_k: int | None = None
    templates: tuple[str, ...] | None = None  # with labels: the prompts for them on any route; None: the route's
    match_labels: bool = True  # task=auto with labels: only tasks that know one of the labels may claim an image

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.ndim != 4:
            raise TypeError(
                "ClassifyItem.images is a tensor [n, 3, H, W] of preprocessed images, got "
                f"{type(self.images).__name__}{list(self.images.shape) if hasattr(self.images, 'shape') else ''}: "
                "torch.stack([backbone.preprocess(viewed_rgb(im)) for im in pil_images])"
            )
        if not self.images.is_floating_point():  # one such item failed its whole batch with torch's dtype error
            raise TypeError(
                f"ClassifyItem.images holds {self.images.dtype} values; preprocessed images are floats: "
                "torch.stack([backbone.preprocess(viewed_rgb(im)) for im in pil_images])"
            )
        if self.images.dtype != torch.float32:  # float64 from numpy, say: the passes run in float32
            object.__setattr__(self, "images", self.images.float())
        for name in ("labels", "templates"):
            value = getattr(self, name)
            if isinstance(value, str):  # 'a {}' was read one character at a time
                raise TypeError(f"ClassifyItem.{name} is a tuple of strings, got the string {value!r:.80}")
            if value is not None:  # a generator, a list: a tuple of strings from here on
                object.__setattr__(self, name, tuple(value))
                if bad := [v for v in getattr(self, name) if not isinstance(v, str)]:
                    raise TypeError(
                        f"ClassifyItem.{name} is a tuple of strings, got {type(bad[0]).__name__} {bad[0]!r:.40}"
                    )
        if problems := field_type_problems(self):  # top_k="2" failed the whole batch; match_labels="false" was True
            raise TypeError("ClassifyItem." + "; ".join(problems))


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
    moved_by_labels: bool = False  # label-aware routing sent it elsewhere than the selectors alone would


def task_scores(bank: BankSnapshot, feats: torch.Tensor) -> torch.Tensor:
    """Selector scores [n, T] (error / threshold) of every active task, for frozen embeddings [n, D]."""
    if not bank.tasks:
        return torch.empty(feats.shape[0], 0)
    return bank.selector_stack.scores(feats)


def route_scores(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing decision for selector scores [n, T]: per row, the task index with the lowest score, or -1
    (zero-shot) when even that is above 1; and that lowest score. Serving, the gate and the routing benchmark all
    decide with this. A score that is not a number (a selector overflowing on some input) claims nothing: it
    neither takes the image nor, as `min` would let it, hides the other tasks' claims."""
    best, idx = scores.masked_fill(scores.isnan(), float("inf")).min(dim=1)
    return torch.where(best <= 1.0, idx, torch.full_like(idx, -1)), best


def known_tasks(bank: BankSnapshot, labels: Sequence[str]) -> torch.Tensor:
    """Label-aware routing: per active task [T], whether it knows at least one of a request's labels (matched
    by `label_key`). A task whose classes share no label with the request was never trained to tell those labels
    apart, so its experts have nothing to add: images sent with labels only other tasks know, or none knows, are
    left to the tasks that know them, or to zero-shot CLIP (docs/method.md, "Label-aware routing")."""
    wanted = {label_key(label) for label in labels}
    return torch.tensor([not wanted.isdisjoint(known) for known in bank.label_sets], dtype=torch.bool)


def only_known(scores: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Selector scores [n, T] with the tasks not `known` [T] unable to claim (their scores infinite)."""
    known = known.to(scores.device)
    return scores if bool(known.all()) else scores.masked_fill(~known, float("inf"))


def select_tasks(bank: BankSnapshot, scores: torch.Tensor, item: ClassifyItem) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the task index (-1 = zero-shot) and its selector score (nan when not scored, or when no task
    that knows the request's labels was left to score it)."""
    n = scores.shape[0]
    if item.task not in (AUTO, ZERO_SHOT):
        t = bank.task_index(item.task)  # raises TaskNotFound
        return torch.full((n,), t, dtype=torch.long), scores[:, t]
    if item.task == ZERO_SHOT or not bank.tasks:
        return torch.full((n,), -1, dtype=torch.long), torch.full((n,), float("nan"))
    if item.labels and item.match_labels:
        scores = only_known(scores, known_tasks(bank, item.labels))
    if item.route == PER_REQUEST:
        scores = scores.mean(0, keepdim=True).expand(n, -1)
    tasks, best = route_scores(scores)
    return tasks, best.masked_fill(best.isinf(), float("nan"))


def _route_of(bank: BankSnapshot, t: int, s: float) -> Route:
    if t < 0:
        return Route(None, score=None if s != s else s)
    task = bank.tasks[t]
    return Route(task.name, task.version, task.bundle_id, s, task.selector.threshold)


def _label_set(bank: BankSnapshot, item: ClassifyItem, t: int) -> tuple[Sequence[str], Sequence[str]] | None:
    """The (labels, templates) an image routed to `t` is scored against; None: nothing to choose among."""
    if item.labels:
        return item.labels, item.templates or (bank.tasks[t].templates if t >= 0 else ZERO_SHOT_TEMPLATES)
    if t >= 0:
        return bank.tasks[t].classes, bank.tasks[t].templates
    if item.task == AUTO:  # no task claimed the image and there is nothing to choose among: say so
        return None
    if item.task == ZERO_SHOT:
        raise InvalidRequest("no labels given: send labels, task zero-shot needs them (zero-shot CLIP has no classes)")
    raise InvalidRequest(
        "no labels given and the image routed to zero-shot CLIP, which has no classes of its own; send labels or "
        "pin a task"
    )


def split_labels(bank: BankSnapshot, item: ClassifyItem, t: int) -> tuple[list[int], list[int]] | None:
    """Labels the routed task `t` partly knows (label-aware requests): the indices of those it learned and of the
    others; None when it knows all or none of them (it scores them all), or the request is not label-aware."""
    if t < 0 or not item.labels or not item.match_labels:
        return None
    learned = bank.label_sets[t]
    mask = [label_key(label) in learned for label in item.labels]
    if all(mask) or not any(mask):
        return None
    return [j for j, m in enumerate(mask) if m], [j for j, m in enumerate(mask) if not m]


def _scoring(bank: BankSnapshot, item: ClassifyItem, t: int) -> tuple[list[tuple], tuple[list[int], list[int]] | None]:
    """How an image routed to `t` is scored: the (task, labels, templates) it needs text embeddings of (its
    route's over its label set; with labels the task partly knows, zero-shot CLIP's over them too), and that split
    (`split_labels`) or None. The same for every image of a request routed to `t`: computed once per request."""
    chosen = _label_set(bank, item, t)
    if chosen is None:
        return [], None
    labels, templates = chosen
    split = split_labels(bank, item, t)
    if split is None:
        return [(t, labels, templates)], None
    as_learned = tuple(prompt_texts(bank, t, labels))  # for zero-shot CLIP too: a class's name as the task has it
    return [(t, labels, templates), (-1, as_learned, item.templates or ZERO_SHOT_TEMPLATES)], split


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
        twice = next(label for i, label in enumerate(item.labels) if label in item.labels[:i])
        return InvalidRequest(f"labels must be distinct: {shown(twice)} is given more than once")
    if item.templates is not None and not (item.labels and 0 < len(item.templates) <= MAX_TEMPLATES):
        return InvalidRequest(f"templates need labels, and there must be 1 to {MAX_TEMPLATES} of them")
    if item.templates is not None and not all(map(template_ok, item.templates)):
        return InvalidRequest("every template must contain exactly one '{}' and no other field")
    return None


@dataclass
class BatchPlan:
    """A batch after its image passes: per image the routed task, its selector score and its final embedding.

    What is left is text: each request's label sets (`text_needs`), then `finish`. A server may compute a
    large label set a chunk at a time in between other batches before finishing the request that needs it.
    """

    bank: BankSnapshot
    items: Sequence[ClassifyItem]
    out: list  # per request: None (answerable so far) or its exception
    spans: dict[int, tuple[int, int]]  # request -> its images' [start, end) in the batch
    feats: torch.Tensor
    tasks: torch.Tensor
    scores: torch.Tensor
    moved: torch.Tensor  # per image: label-aware routing sent it elsewhere than the selectors alone would
    frozen: torch.Tensor  # per image: its frozen embedding (zero-shot CLIP's view of a routed image)

    def text_needs(self, k: int) -> list[tuple[int, Sequence[str], Sequence[str]]]:
        """The distinct (task, labels, templates) request `k` needs embeddings of (empty if it failed)."""
        if self.out[k] is not None:
            return []
        a, b = self.spans[k]
        needs: dict[tuple, tuple[int, Sequence[str], Sequence[str]]] = {}
        scoring = functools.cache(functools.partial(_scoring, self.bank, self.items[k]))  # once per routed task
        try:
            for i in range(a, b):
                for need in scoring(int(self.tasks[i]))[0]:
                    needs.setdefault(text_key(self.bank, *need), need)
        except InvalidRequest:
            return []  # `finish` reports it
        return list(needs.values())

    def finish(
        self, k: int, cache: TextCache | None = None, known: Mapping[tuple, torch.Tensor] | None = None
    ) -> list[ImageResult] | Exception:
        """Request `k`'s answer (or its exception), with text embeddings from `known`, the cache, or computed."""
        if self.out[k] is not None:
            return self.out[k]
        bank, item = self.bank, self.items[k]
        scale = float(bank.backbone.model.logit_scale.exp())
        results = []
        a, b = self.spans[k]
        scoring = functools.cache(functools.partial(_scoring, bank, item))  # once per routed task
        try:
            for i in range(a, b):
                t, score = int(self.tasks[i]), float(self.scores[i])
                needs, split = scoring(t)
                if not needs:
                    results.append(ImageResult([], _route_of(bank, t, score)))  # no labels: not moved by them
                    continue
                labels = needs[0][1]
                texts = [text_embeddings(bank, *need, cache, known) for need in needs]
                logits = scale * self.feats[i] @ texts[0].T
                if split is not None:  # labels the task partly knows
                    probs = split_probs(logits, scale * self.frozen[i] @ texts[1].T, split).cpu()
                else:
                    probs = torch.softmax(logits, dim=-1).cpu()
                order = probs.argsort(descending=True)[: item.top_k or len(labels)]
                ranked = list(zip([labels[j] for j in order.tolist()], probs[order].tolist(), strict=True))
                results.append(ImageResult(ranked, _route_of(bank, t, score), bool(self.moved[i])))
        except Exception as e:  # reported per request
            return e
        return results


def split_probs(task: torch.Tensor, zero_shot: torch.Tensor, split: tuple[list[int], list[int]]) -> torch.Tensor:
    """Probabilities over every label of an image whose task learned only some of them (`split`: their indices,
    the others'), from the task's logits and zero-shot CLIP's over all of them [..., labels].

    The image is one of the labels the task never learned only as far as both agree: that share is the smaller of
    the two's probability mass on them, divided among those labels as zero-shot CLIP divides it; the rest goes to the
    task's own labels as its experts divide them. Either alone favours those labels too often on some domains
    (docs/method.md, measured by `benchmarks/unknown_labels.py`)."""
    known, unknown = split
    task_p, zero_shot_p = task.softmax(-1), zero_shot.softmax(-1)
    share = torch.minimum(task_p[..., unknown].sum(-1, keepdim=True), zero_shot_p[..., unknown].sum(-1, keepdim=True))
    # 1 - share, summed from the small side: 1 - (1 - 1e-11) is 0 in float32, and the task's order would be lost
    rest = torch.maximum(task_p[..., known].sum(-1, keepdim=True), zero_shot_p[..., known].sum(-1, keepdim=True))
    probs = torch.empty_like(zero_shot)
    probs[..., known] = rest * task[..., known].softmax(-1)
    probs[..., unknown] = share * zero_shot[..., unknown].softmax(-1)
    return probs


class ImagePasses:
    """A batch's image passes, computed a slice of images at a time: the frozen pass over every image; then,
    once all are in, the selector scores (once for the batch) and each request's routing; then the adapted
    pass, tasks mixed, over the routed images. A server interleaves the slices of a large batch with other
    requests; `plan_batch` runs them all at once. Requests that cannot be answered get their exception in `out`.
    """

    def __init__(self, bank: BankSnapshot, items: Sequence[ClassifyItem]) -> None:
        self.bank, self.items = bank, items
        self.out: list = [check_item(bank, it) for it in items]
        live = [k for k, e in enumerate(self.out) if e is None]
        sizes = [len(items[k].images) for k in live]
        self.spans = {k: (s - n, s) for k, n, s in zip(live, sizes, itertools.accumulate(sizes), strict=True)}
        self.tasks = torch.full((sum(sizes),), -1, dtype=torch.long)
        self.scores = torch.full((sum(sizes),), float("nan"))
        self.moved = torch.zeros(sum(sizes), dtype=torch.bool)  # by label-aware routing
        bb = bank.backbone
        self.images = torch.cat([items[k].images for k in live]).to(bb.device) if live else None
        self.feats = torch.empty(0, bb.embed_dim)
        # shared frozen prefix: the frozen pass keeps each image's tokens entering the first block with experts,
        # and the adapted pass starts there (PyTorch runs the frozen image pass then, whatever the runtime)
        self.prefix = bank.prefix_block
        self._token_parts: list[torch.Tensor] = []
        self._tokens: torch.Tensor | None = None
        self._frozen: list[torch.Tensor] = []
        self._routed: torch.Tensor | None = None  # known once the frozen pass is complete
        self.frozen: torch.Tensor | None = None  # then: every image's frozen embedding, and the selector scores
        self.all_scores: torch.Tensor | None = None
        self._done = 0  # images through the current pass

    @property
    def done(self) -> bool:
        return self.images is None or (self._routed is not None and self._done >= len(self._routed))

    def step(self, n: int) -> bool:
        """Compute up to `n` more images of the current pass; True once both passes are complete."""
        if self.done:
            return True
        bb = self.bank.backbone
        if self._routed is None:
            part = self.images[self._done : self._done + max(1, n)]
            with torch.inference_mode(), bb.compute():
                if self.prefix:
                    self._token_parts.append(image_tokens(bb.model, part, self.prefix))
                    self._frozen.append(encode_image_from(bb.model, self._token_parts[-1], self.prefix).float())
                else:
                    self._frozen.append(bb.frozen.image(part).float())
            self._done += len(part)
            if self._done == len(self.images):
                self._route(torch.cat(self._frozen))
            return self.done
        idx = self._routed[self._done : self._done + max(1, n)]
        routing = self.bank.routing(self.tasks[idx.cpu()])
        with torch.inference_mode(), bb.compute():
            if self._tokens is not None:
                tokens = self._tokens[self._done : self._done + len(idx)]
                self.feats[idx] = encode_image_from(bb.model, tokens, self.prefix, routing).float()
            else:
                self.feats[idx] = encode_image(bb.model, self.images[idx], routing).float()
        self._done += len(idx)
        return self.done

    def _route(self, frozen: torch.Tensor) -> None:
        all_scores = task_scores(self.bank, frozen)  # once for the whole batch
        for k, (a, b) in self.spans.items():
            try:
                item = self.items[k]
                self.tasks[a:b], self.scores[a:b] = select_tasks(self.bank, all_scores[a:b], item)
                if item.task == AUTO and item.labels and item.match_labels:
                    alone = select_tasks(self.bank, all_scores[a:b], replace(item, match_labels=False))[0]
                    self.moved[a:b] = alone.cpu() != self.tasks[a:b]
            except Exception as e:  # reported per request
                self.out[k] = e
        self.feats, self.frozen, self.all_scores = frozen.clone(), frozen, all_scores
        self._routed = (self.tasks >= 0).nonzero(as_tuple=True)[0].to(self.bank.backbone.device)
        if self.prefix and len(self._routed):  # the routed images' tokens; none kept when no image is routed
            self._tokens = torch.cat(self._token_parts)[self._routed]
        self._token_parts = []
        self._done = 0

    def plan(self) -> BatchPlan:
        if not self.done:
            raise RuntimeError("the image passes are not complete")
        frozen = self.frozen if self.frozen is not None else self.feats  # no image: both empty
        return BatchPlan(
            self.bank, self.items, self.out, self.spans, self.feats, self.tasks, self.scores, self.moved, frozen
        )


def plan_batch(bank: BankSnapshot, items: Sequence[ClassifyItem]) -> BatchPlan:
    """One frozen pass for every image, selector scores once, routing per request, one adapted pass that mixes
    tasks for the routed images. Requests that cannot be answered get their exception in `out`."""
    passes = ImagePasses(bank, items)
    while not passes.step(1 << 30):
        pass
    return passes.plan()


def classify_batch(
    bank: BankSnapshot, items: Sequence[ClassifyItem], cache: TextCache | None = None
) -> list[list[ImageResult] | Exception]:
    """Answer several requests with one frozen pass and one adapted pass that mixes tasks.

    A request that cannot be answered gets its exception in its place; the others are unaffected.
    """
    cache = cache if cache is not None else TextCache()  # at least one text pass per label set in this batch
    plan = plan_batch(bank, items)
    return [plan.finish(k, cache) for k in range(len(items))]

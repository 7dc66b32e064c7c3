"""Shadow scoring and the unclaimed share of a batch: what live traffic would do under a version in shadow, and
which images no task claimed (docs/safety.md).

A version in shadow costs one selector score per auto-routed image. Its would-be claims are decided exactly as
the bank it would join decides: its score takes the place of its task's active version (if any) in the bank's
task order, a request's labels leave out the tasks that know none of them (label-aware routing), per-request
routing averages over the request, then argmin, zero-shot above 1 (`inference.route_scores`). So what shadow
reports is what promotion would do on the same images.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .bank import BankSnapshot, ShadowEntry
from .inference import ClassifyItem, known_tasks, only_known, route_scores
from .labels import label_key
from .modes import AUTO, PER_REQUEST
from .selector import score


@dataclass(frozen=True)
class AutoSpan:
    """The images [start, end) of one answered request with task=auto; `per_request`: its route mode."""

    start: int
    end: int
    per_request: bool = False
    labels: tuple[str, ...] | None = None  # the request's labels when it routes on them (`match_labels`)


@dataclass(frozen=True)
class ShadowSeen:
    """A batch's auto-routed images as seen by one version in shadow."""

    task: str
    version: int
    bundle_id: str
    scores: torch.Tensor  # [m] its selector score per image (error / threshold)
    claimed: torch.Tensor  # [m] bool: promoted, it would take the image
    routes: tuple[str | None, ...]  # [m] where each image is routed now (None: zero-shot)


def auto_spans(items: Sequence[ClassifyItem], spans: Mapping[int, tuple[int, int]], out: Sequence) -> list[AutoSpan]:
    """The spans of a batch's answered (so far) requests with task=auto: the traffic selectors route."""
    return [
        AutoSpan(a, b, items[k].route == PER_REQUEST, items[k].labels if items[k].match_labels else None)
        for k, (a, b) in sorted(spans.items(), key=lambda kv: kv[1])
        if out[k] is None and items[k].task == AUTO
    ]


def auto_rows(spans: Sequence[AutoSpan]) -> torch.Tensor:
    """The batch rows of the spans' images, in order."""
    return torch.tensor([i for s in spans for i in range(s.start, s.end)], dtype=torch.long)


def _would_claim(names: Sequence[str], scores: torch.Tensor, own: torch.Tensor, shadow: str) -> torch.Tensor:
    """Per row, whether the bank with `shadow`'s score in place of its task's column routes to it."""
    keep = [i for i, name in enumerate(names) if name != shadow]
    pos = bisect.bisect_left([names[i] for i in keep], shadow)
    candidate = torch.cat([scores[:, keep[:pos]], own[:, None], scores[:, keep[pos:]]], dim=1)
    routed, _ = route_scores(candidate)
    return routed == pos


def observe(
    bank: BankSnapshot,
    frozen: torch.Tensor,
    scores: torch.Tensor,
    tasks: torch.Tensor,
    spans: Sequence[AutoSpan],
    rows: torch.Tensor | None = None,
) -> list[ShadowSeen]:
    """Every shadow's view of a batch: `frozen` embeddings [n, D], the bank's selector `scores` [n, T], the routed
    task index per image `tasks` [n] (-1: zero-shot), the auto requests' `spans` (and their `auto_rows`)."""
    if not bank.shadows or not spans:
        return []
    rows = auto_rows(spans) if rows is None else rows
    names = bank.task_names
    routes = tuple(names[t] if t >= 0 else None for t in tasks[rows].tolist())
    return [_seen(bank, entry, frozen, scores, rows, routes, spans) for entry in bank.shadows]


def _seen(
    bank: BankSnapshot,
    entry: ShadowEntry,
    frozen: torch.Tensor,
    scores: torch.Tensor,
    rows: torch.Tensor,
    routes: tuple[str | None, ...],
    spans: Sequence[AutoSpan],
) -> ShadowSeen:
    own = score(entry.selector, frozen[rows.to(frozen.device)]).float().cpu()
    part, mine, at = scores[rows], own.clone(), 0
    for span in spans:
        n = span.end - span.start
        if span.labels:  # label-aware routing, as `inference.select_tasks`: only tasks that know a label claim
            part[at : at + n] = only_known(part[at : at + n], known_tasks(bank, span.labels))
            if entry.label_set.isdisjoint(label_key(label) for label in span.labels):
                mine[at : at + n] = float("inf")
        if span.per_request:  # as `inference.select_tasks` routes such a request: on the mean over its images
            part[at : at + n] = part[at : at + n].mean(0, keepdim=True)
            mine[at : at + n] = mine[at : at + n].mean()
        at += n
    claimed = _would_claim(bank.task_names, part, mine, entry.name)
    return ShadowSeen(entry.name, entry.version, entry.bundle_id, own, claimed, routes)

"""Measure a bank on labelled test sets: per-image routing rates and accuracy, auto-routed and zero-shot."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from model_store.bank import BankSnapshot
from model_store.inference import AUTO, ZERO_SHOT, ClassifyItem, TextCache, classify_batch

from .data import LabelledImages


def accuracy_and_routes(
    bank: BankSnapshot,
    data: LabelledImages,
    task: str,
    cache: TextCache,
    batch: int = 128,
    route: str = "per-image",
    templates: tuple[str, ...] | None = None,
    match_labels: bool = True,
) -> tuple[float, Counter]:
    """Accuracy over `data.classes` as the server would answer, and how many images went to each route.

    With `route="per-request"`, each batch of `batch` images is routed as one (the paper's per-batch DDAS).
    `templates`: the prompts for the labels on every route; None: the server's (the task's, or zero-shot's).
    `match_labels`: label-aware routing, as the server does by default; False: the selectors alone route.
    """
    correct, routes = 0, Counter()
    for s in range(0, len(data), batch):
        x = torch.stack([bank.backbone.preprocess(im) for im in data.images[s : s + batch]])
        item = ClassifyItem(x, tuple(data.classes), task, route, 1, templates, match_labels)
        (results,) = classify_batch(bank, [item], cache)
        if isinstance(results, Exception):
            raise results
        for r, y in zip(results, data.labels[s : s + batch], strict=True):
            correct += r.labels[0][0] == data.classes[y]
            routes[r.route.task or ZERO_SHOT] += 1
    return correct / len(data), routes


def route_report(bank: BankSnapshot, sets: dict[str, LabelledImages]) -> dict[str, Any]:
    """Per set: zero-shot accuracy, auto-routed accuracy, and the fraction of images routed to each task, by the
    selectors alone (`match_labels=False`: a set's labels would otherwise decide for the tasks that lack them)."""
    cache = TextCache()
    out = {}
    for name, data in sets.items():
        zs, _ = accuracy_and_routes(bank, data, ZERO_SHOT, cache)
        auto, routes = accuracy_and_routes(bank, data, AUTO, cache, match_labels=False)
        out[name] = {
            "images": len(data),
            "zero_shot_accuracy": zs,
            "auto_accuracy": auto,
            "routes": {k: v / len(data) for k, v in sorted(routes.items())},
        }
    return out


def format_route_report(report: dict[str, Any]) -> str:
    lines = [
        "accuracy of plain zero-shot CLIP, and of the bank routing each image (auto); then where images went",
        f"{'test set':10s} {'images':>6s} {'zero-shot':>9s} {'routed':>7s}  routes",
    ]
    for name, r in report.items():
        routes = ", ".join(f"{k} {v:.1%}" for k, v in r["routes"].items())
        lines.append(f"{name:10s} {r['images']:6d} {r['zero_shot_accuracy']:9.1%} {r['auto_accuracy']:7.1%}  {routes}")
    return "\n".join(lines)

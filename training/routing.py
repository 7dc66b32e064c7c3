"""Routing measured on its own: selectors fitted task after task on frozen embeddings, routing as the server does.

Routing depends only on the frozen embeddings and the selectors, not on the experts, so a long sequence of
tasks, look-alike pairs and near outside domains can be measured in seconds, for every selector kind.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model_store.backbone import Backbone
from model_store.reference import ReferenceSet, embed_images
from model_store.selector import Selector, SelectorConfig, fit_selector, score

from .domains import get_domain
from .lookalike import LONG_SEQUENCE, NEAR_OUTSIDE

KINDS = ("autoencoder", "gaussian", "discriminative")
PROBES = 256  # embeddings of a task's held-out images kept in its bundle (docs/bundle-format.md)


@dataclass(frozen=True)
class RoutingConfig:
    kinds: tuple[str, ...] = KINDS
    sequence: tuple[str, ...] = LONG_SEQUENCE
    near: tuple[str, ...] = NEAR_OUTSIDE
    outside: str = "shapes"
    probes: int = PROBES
    selector: SelectorConfig = field(default_factory=SelectorConfig)


class Embeddings:
    """Frozen embeddings of domain splits, computed once."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def __call__(self, name: str, split: str) -> torch.Tensor:
        if (name, split) not in self._cache:
            images, _ = get_domain(name).split(split)
            self._cache[name, split] = embed_images(self.backbone, images)
        return self._cache[name, split]


def probes_of(val: torch.Tensor, n: int = PROBES, seed: int = 0) -> torch.Tensor:
    """A bounded, deterministic sample of a task's held-out embeddings."""
    if len(val) <= n:
        return val
    return val[torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))[:n]]


def routes(selectors: Sequence[Selector], feats: torch.Tensor) -> torch.Tensor:
    """The task index each embedding goes to (-1: zero-shot), exactly as `select_tasks` decides per image."""
    if not selectors:
        return torch.full((len(feats),), -1, dtype=torch.long)
    scores = torch.stack([score(s, feats).float() for s in selectors], dim=1)
    best, idx = scores.min(dim=1)
    return torch.where(best <= 1.0, idx, torch.full_like(idx, -1))


def fit_sequence(
    emb: Embeddings, kind: str, cfg: RoutingConfig, reference: ReferenceSet | None
) -> tuple[list[Selector], list[dict[str, Any]]]:
    """Each task's selector in turn, with the reference set and the earlier tasks' probes as negatives; and,
    after each task, how the bank so far routes every test set."""
    selectors: list[Selector] = []
    probes: list[torch.Tensor] = []
    ref_fit, ref_held = reference.split() if reference is not None else (None, None)
    curve = []
    sel_cfg = SelectorConfig(**{**vars(cfg.selector), "kind": kind})
    for t, name in enumerate(cfg.sequence):
        parts = ([ref_fit] if ref_fit is not None else []) + probes
        negatives = torch.cat(parts) if parts else None
        selectors.append(fit_selector(emb(name, "train"), emb(name, "val"), sel_cfg, negatives, ref_held))
        probes.append(probes_of(emb(name, "val"), cfg.probes))
        curve.append(_routing_after(emb, cfg, selectors, t + 1))
    return selectors, curve


def _routing_after(emb: Embeddings, cfg: RoutingConfig, selectors: list[Selector], n_tasks: int) -> dict[str, Any]:
    learned = cfg.sequence[:n_tasks]
    own = {name: float((routes(selectors, emb(name, "test")) == t).float().mean()) for t, name in enumerate(learned)}
    unseen = [*cfg.sequence[n_tasks:], cfg.outside, *cfg.near]
    fallback = {name: float((routes(selectors, emb(name, "test")) == -1).float().mean()) for name in unseen}
    return {
        "tasks": n_tasks,
        "task_accuracy": sum(own.values()) / len(own),
        "own": own,
        "zero_shot_fallback": sum(fallback.values()) / len(fallback),
        "fallback": fallback,
    }


def selector_cost(backbone: Backbone, selectors: Sequence[Selector], images: int = 64, repeats: int = 5) -> dict:
    """Seconds per image of the frozen image pass and of scoring every selector, measured side by side."""
    x = torch.rand(images, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        feats = backbone.frozen.image(x)
        frozen, scoring = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            feats = backbone.frozen.image(x)
            t1 = time.perf_counter()
            torch.stack([score(s, feats) for s in selectors], dim=1)
            scoring.append(time.perf_counter() - t1)
            frozen.append(t1 - t0)
    f, s = sorted(frozen)[repeats // 2] / images, sorted(scoring)[repeats // 2] / images
    return {"frozen_pass_s": f, "selectors_s": s, "selectors_vs_frozen": s / f, "tasks": len(selectors)}


def run_routing(backbone: Backbone, reference: ReferenceSet | None, cfg: RoutingConfig | None = None) -> dict:
    """Per selector kind: the curve over the sequence, each task's own routing, and fallback on the plain and
    near outside domains, with the bank of every task; and the selectors' cost beside a frozen pass."""
    cfg = cfg or RoutingConfig()
    emb = Embeddings(backbone)
    out: dict[str, Any] = {"sequence": list(cfg.sequence), "near": list(cfg.near), "outside": cfg.outside}
    out["reference"] = len(reference) if reference is not None else 0
    for kind in cfg.kinds:
        selectors, curve = fit_sequence(emb, kind, cfg, reference)
        final = curve[-1]
        out[kind] = {
            "curve": curve,
            "long": {"task_accuracy": final["task_accuracy"], "own": final["own"]},
            "near_ood": {name: final["fallback"][name] for name in cfg.near},
            "plain_ood": final["fallback"][cfg.outside],
            "cost": selector_cost(backbone, selectors),
        }
        out[kind]["long"]["zero_shot_fallback"] = (sum(out[kind]["near_ood"].values()) + out[kind]["plain_ood"]) / (
            len(cfg.near) + 1
        )
    return out

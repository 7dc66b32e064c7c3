"""Routing measured on its own: selectors fitted task after task on frozen embeddings, routing as the server does.

Routing depends only on the frozen embeddings and the selectors, not on the experts, so a long sequence of
tasks, look-alike pairs and near outside domains can be measured in seconds, for every selector kind.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model_store.backbone import Backbone
from model_store.bank import BankSnapshot
from model_store.bundle import MAX_PROBES
from model_store.gate import GateLimits, GateReport, gate_report, held_by, shares_versus
from model_store.inference import only_known, route_scores, task_scores
from model_store.labels import label_key
from model_store.reference import ReferenceSet, embed_images
from model_store.selector import NEEDS_NEGATIVES, Selector, SelectorConfig, calibrate, fit_selector, score

from .data import LabelledImages
from .domains import get_domain
from .lookalike import LONG_SEQUENCE, NEAR_OUTSIDE
from .progress import progress_bar
from .scoring import frozen_features

KINDS = ("hybrid", "autoencoder", "gaussian", "discriminative")
PROBES = MAX_PROBES  # embeddings of a task's held-out images kept in its bundle (docs/bundle-format.md)

# What `clipbank train` warns about (docs/method.md, "What training reports about routing").
SELF_CLAIM_MIN = 0.95  # of the task's held-out images its selector claims
ROUTED_OWN_MIN = 0.90  # of them the whole bank, this task included, routes to it
REFERENCE_CLAIM_MAX = 0.05  # of the reference set's held-out images it claims
TASK_CLAIM_MAX = 0.10  # of another active task's probes it claims


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


def _halves(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: n // 2], order[n // 2 :]


@dataclass(frozen=True)
class Negatives:
    """What a new task's selector is shown that is not its task."""

    fit: torch.Tensor | None  # trains the discriminative kind: most of the reference set, other tasks' probes
    held: torch.Tensor | None  # never fitted: the reference set's held-out part, for calibration and the report
    probes: dict[str, torch.Tensor]  # other active task -> its probes not fitted, for the report
    reference: dict[str, Any]  # {n, source} of the reference set, or {} when the backbone has none


def negatives_for(bank: BankSnapshot, task: str, reference: ReferenceSet | None, kind: str, seed: int = 0) -> Negatives:
    """The reference set and the probes of the bank's other tasks, split into what a selector may fit and what
    stays out for calibration and for the report. Probes are split only for the kind that fits on them."""
    ref_fit, ref_held = reference.split(seed=seed) if reference is not None else (None, None)
    fit = [ref_fit] if ref_fit is not None else []
    held_probes = {}
    for i, entry in enumerate(bank.tasks):
        if entry.name == task or entry.probes is None:
            continue  # a task's own earlier version is not a negative
        probes = entry.probes.float().cpu()
        if kind in NEEDS_NEGATIVES and len(probes) >= 4:
            a, b = _halves(len(probes), seed + i)
            fit.append(probes[a])
            probes = probes[b]
        held_probes[entry.name] = probes
    info = {"n": len(reference), "source": reference.source} if reference is not None else {}
    return Negatives(torch.cat(fit) if fit else None, ref_held, held_probes, info)


def _claimed(selector: Selector, feats: torch.Tensor) -> float:
    return float((score(selector, feats) <= 1.0).double().mean()) if len(feats) else 0.0  # 19 of 20: 0.95


def _no_claim_if_nan(scores: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(scores.isnan(), float("inf"))  # a selector overflowing claims nothing


def routing_check(
    selector: Selector,
    cfg: SelectorConfig,
    val: torch.Tensor,
    negatives: Negatives,
    bank: BankSnapshot,
    task: str,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """What routing will do with this selector in this bank, measured on images its threshold never saw: the
    threshold is re-calibrated on one half of the held-out images (and of the reference's held-out part) and
    measured on the other, both ways round, and the two are averaged. Adds `warnings` for what is poor.

    `routed_own` is as served to clients that send the task's `classes` as labels: only the tasks that know one
    of them compete (label-aware routing); `routed_own_selectors_alone` lets every task compete."""
    keys = {label_key(c) for c in classes} if classes is not None else None
    others = [
        (t.name, t.selector, keys is None or not keys.isdisjoint(known))
        for t, known in zip(bank.tasks, bank.label_sets, strict=True)
        if t.name != task
    ]
    served, alone = [s for _, s, shares in others if shares], [s for _, s, _ in others]
    dev = next(iter(selector.tensors().values())).device
    folds = []
    for k in range(2):
        own_a, own_b = _halves(len(val), 0)[:: 1 if k == 0 else -1] if len(val) >= 2 else (slice(None),) * 2
        trial = copy.copy(selector)
        held = negatives.held
        if held is not None and len(held) >= 2:
            ref_a, ref_b = _halves(len(held), 1)[:: 1 if k == 0 else -1]
            held_cal, held_test = held[ref_a], held[ref_b]
        else:
            held_cal = held_test = held
        calibrate(trial, val[own_a], cfg, held_cal)
        test = val[own_b].to(dev)
        mine = _no_claim_if_nan(score(trial, test))  # as `route_scores` decides
        folds.append(
            {
                "self_claim": _claimed(trial, test),
                "routed_own": _routed_own(mine, served, test),
                "routed_own_selectors_alone": _routed_own(mine, alone, test),
                "reference_false_claim": _claimed(trial, held_test.to(dev)) if held_test is not None else None,
                "task_false_claim": {n: _claimed(trial, p.to(dev)) for n, p in negatives.probes.items()},
            }
        )
    out: dict[str, Any] = {
        key: (None if folds[0][key] is None else sum(f[key] for f in folds) / 2)
        for key in ("self_claim", "routed_own", "routed_own_selectors_alone", "reference_false_claim")
    }
    out["task_false_claim"] = {n: sum(f["task_false_claim"][n] for f in folds) / 2 for n in negatives.probes}
    out["reference"] = negatives.reference
    out["bank_tasks"] = [n for n, _, _ in others]
    out["warnings"] = routing_warnings(out)
    return out


def selector_with_routing(
    bank: BankSnapshot,
    task: str,
    cfg: SelectorConfig,
    seed: int,
    data: tuple[LabelledImages, LabelledImages],
    reference: ReferenceSet | None,
    version: int,
) -> tuple[Selector, dict[str, Any], torch.Tensor]:
    """A task's selector, fitted on `data` (fit, val) against the reference set and the bank's probes; its routing
    check, with what the server's gate would say of the version and the warnings; and the probes its bundle keeps."""
    fit, val = data
    val_feats = frozen_features(bank.backbone, val)
    negatives = negatives_for(bank, task, reference, cfg.kind, seed)
    selector = fit_selector(frozen_features(bank.backbone, fit), val_feats, cfg, negatives.fit, negatives.held)
    routing = routing_check(selector, cfg, val_feats, negatives, bank, task, fit.classes)
    probes = probes_of(val_feats, MAX_PROBES, seed)
    routing["gate"] = gate_preview(bank, task, version, selector, probes, reference).to_json()
    routing["warnings"] = routing_warnings(routing)
    return selector, routing, probes


def gate_preview(
    bank: BankSnapshot,
    task: str,
    version: int,
    selector: Selector,
    probes: torch.Tensor,
    reference: ReferenceSet | None,
    limits: GateLimits | None = None,
) -> GateReport:
    """What a server holding `bank` would say of this version at its gate (default limits unless given): the
    server's own report (`model_store.gate`), on the bank with this version in place of any other of the task."""
    keep = [i for i, t in enumerate(bank.tasks) if t.name != task]
    others = {bank.tasks[i].name: bank.tasks[i].probes for i in keep}
    # in the served bank's order, by name: an image two selectors score the same goes to the first of them, and
    # with the new task last a twin of an older task (the same images) looked harmless here, then took 98% of
    # that task's images once served (an outside check), where the server's own gate refused it
    names = sorted([*others, task])
    at = names.index(task)

    def scores(feats: torch.Tensor) -> torch.Tensor:
        mine = score(selector, feats.to(next(iter(selector.tensors().values())).device)).float().to(feats.device)
        theirs = task_scores(bank, feats)[:, keep].to(feats.device)
        return torch.cat([theirs[:, :at], mine[:, None], theirs[:, at:]], dim=1)

    ref = reference.embeddings if reference is not None else None
    device = bank.backbone.device
    # what the task's version in `bank` routes to it already is not taken by this one (as the server's gate says)
    held = None
    if len(keep) < len(bank.tasks):
        held = held_by(functools.partial(task_scores, bank), bank.task_index(task), device)
    return gate_report(task, version, scores, names, probes, others, ref, limits or GateLimits(), device, held)


def _routed_own(mine: torch.Tensor, rivals: Sequence[Selector], test: torch.Tensor) -> float:
    """The share of `test` images the task claims (`mine` <= 1) with no rival scoring them lower."""
    if not rivals:
        return float((mine <= 1.0).double().mean())
    rival = _no_claim_if_nan(torch.stack([score(s, test) for s in rivals], 1)).min(1).values
    return float(((mine <= 1.0) & (mine < rival)).double().mean())


def routing_warnings(check: dict[str, Any]) -> list[str]:
    """Plain sentences for each poor figure of a routing check (empty when all are fine)."""
    w = []
    if check["self_claim"] < SELF_CLAIM_MIN:  # with the digits that show it is under: not "95.0% (want >= 95.0%)"
        claimed, least = shares_versus(check["self_claim"], SELF_CLAIM_MIN)
        w.append(
            f"the selector claims only {claimed} of the task's held-out images (want >= {least}), images its "
            "threshold never saw (the gate's self_claim, on those it was set on, is higher): the rest will be answered "
            "by zero-shot CLIP. More training images help; `--selector autoencoder` claims more, outside images too"
        )
    if check["routed_own"] < min(ROUTED_OWN_MIN, check["self_claim"] - 0.02):  # others take what it claims
        routed, least = shares_versus(check["routed_own"], ROUTED_OWN_MIN)
        w.append(
            f"in this bank only {routed} of the task's held-out images route to it (want >= {least}): another "
            "task's selector claims them first"
        )
    alone = check.get("routed_own_selectors_alone")
    if alone is not None and alone < min(ROUTED_OWN_MIN, check["self_claim"] - 0.02) <= check["routed_own"]:
        w.append(
            f"sent without labels (or with match_labels=false) only {alone:.1%} of the task's held-out images route "
            f"to it (want >= {ROUTED_OWN_MIN:.1%}): a task with other classes claims them first; sent with the "
            "task's labels, they do route to it"
        )
    if not check["reference"]:
        w.append(
            "no reference set for this backbone: the selector has seen no outside images, so it may claim any "
            "traffic that looks like the task; build one with `clipbank reference build --images DIR`"
        )
    elif check["reference_false_claim"] is not None and check["reference_false_claim"] > REFERENCE_CLAIM_MAX:
        w.append(
            f"the selector claims {check['reference_false_claim']:.1%} of generic outside images (want <= "
            f"{REFERENCE_CLAIM_MAX:.1%}): outside traffic that looks like the task will reach its experts"
        )
    gate = check.get("gate")
    if gate is not None and gate["offences"]:
        w.append(
            "a server's interference gate (default limits) would refuse this version: "
            + "; ".join(gate["offences"])
            + " (`clipbank push --force` lands it anyway)"
        )
    for name, rate in sorted(check["task_false_claim"].items()):
        if rate > TASK_CLAIM_MAX:
            w.append(
                f"the selector claims {rate:.1%} of the probe images of active task {name!r} (want <= "
                f"{TASK_CLAIM_MAX:.1%}): the two tasks look alike to the backbone"
            )
    return w


def routes(selectors: Sequence[Selector], feats: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """The task index each embedding goes to (-1: zero-shot), decided as the server decides (`route_scores`);
    `known` [T]: the tasks that know the request's labels (`inference.known_tasks`), None: the selectors alone."""
    if not selectors:
        return torch.full((len(feats),), -1, dtype=torch.long)
    scores = torch.stack([score(s, feats).float() for s in selectors], dim=1)
    return route_scores(scores if known is None else only_known(scores, known))[0]


def fit_sequence(
    emb: Embeddings,
    kind: str,
    cfg: RoutingConfig,
    reference: ReferenceSet | None,
    done: Callable[[], Any] | None = None,
) -> tuple[list[Selector], list[dict[str, Any]]]:
    """Each task's selector in turn, with the reference set and the earlier tasks' probes as negatives; and,
    after each task, how the bank so far routes every test set. `done()` is called after each task."""
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
        if done is not None:
            done()
    return selectors, curve


def _known_by(learned: Sequence[str], name: str) -> torch.Tensor:
    """Which learned tasks know at least one of domain `name`'s labels: what label-aware routing lets claim its
    images when a client sends them with their own labels."""
    keys = {label_key(c) for c in get_domain(name).classes}
    return torch.tensor([not keys.isdisjoint(label_key(c) for c in get_domain(t).classes) for t in learned])


def _routing_after(emb: Embeddings, cfg: RoutingConfig, selectors: list[Selector], n_tasks: int) -> dict[str, Any]:
    """How the bank of the first `n_tasks` routes every test set: by the selectors alone, and as served to clients
    that send each image with its own domain's labels (`_labels`: label-aware routing, the server's default)."""
    learned = cfg.sequence[:n_tasks]
    unseen = [*cfg.sequence[n_tasks:], cfg.outside, *cfg.near]
    out: dict[str, Any] = {"tasks": n_tasks}
    for suffix, known in (("", lambda name: None), ("_labels", lambda name: _known_by(learned, name))):
        own = {
            n: float((routes(selectors, emb(n, "test"), known(n)) == t).float().mean()) for t, n in enumerate(learned)
        }
        fallback = {n: float((routes(selectors, emb(n, "test"), known(n)) == -1).float().mean()) for n in unseen}
        out["task_accuracy" + suffix] = sum(own.values()) / len(own)
        out["own" + suffix] = own
        out["zero_shot_fallback" + suffix] = sum(fallback.values()) / len(fallback)
        out["fallback" + suffix] = fallback
    return out


def selector_cost(backbone: Backbone, selectors: Sequence[Selector], images: int = 64, repeats: int = 20) -> dict:
    """Seconds per image of the frozen image pass and of scoring every selector, measured side by side: the fastest
    of `repeats` runs of each (another process's load only adds time; the median of 5 moved 25x under it, an
    outside check saw the hybrid 36x cheaper than the autoencoder it contains)."""
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
    f, s = min(frozen) / images, min(scoring) / images
    return {"frozen_pass_s": f, "selectors_s": s, "selectors_vs_frozen": s / f, "tasks": len(selectors)}


def run_routing(
    backbone: Backbone, reference: ReferenceSet | None, cfg: RoutingConfig | None = None, progress: bool = False
) -> dict:
    """Per selector kind: the curve over the sequence, each task's own routing, and fallback on the plain and
    near outside domains, with the bank of every task; and the selectors' cost beside a frozen pass. `progress`:
    a bar over the kinds' tasks (`clipbank bench routing` was silent for its minute; over the kinds alone, an
    outside check's log said nothing for 9 minutes on a busy machine)."""
    cfg = cfg or RoutingConfig()
    emb = Embeddings(backbone)
    out: dict[str, Any] = {"sequence": list(cfg.sequence), "near": list(cfg.near), "outside": cfg.outside}
    out["reference"] = len(reference) if reference is not None else 0
    total = len(cfg.kinds) * len(cfg.sequence)
    bar = progress_bar(total=total, desc="bench routing", unit="selector", disable=not progress)
    for kind in cfg.kinds:
        bar.set_description(f"bench routing: {kind}", refresh=False)
        selectors, curve = fit_sequence(emb, kind, cfg, reference, bar.update)
        out[kind] = {"curve": curve, "cost": selector_cost(backbone, selectors)}
        for suffix in ("", "_labels"):  # the selectors alone; as served to clients sending their own labels
            final = curve[-1]
            near = {name: final["fallback" + suffix][name] for name in cfg.near}
            plain = final["fallback" + suffix][cfg.outside]
            out[kind]["long" + suffix] = {
                "task_accuracy": final["task_accuracy" + suffix],
                "own": final["own" + suffix],
                "zero_shot_fallback": (sum(near.values()) + plain) / (len(cfg.near) + 1),
            }
            out[kind]["near_ood" + suffix], out[kind]["plain_ood" + suffix] = near, plain
    bar.close()
    return out

"""Continual-learning benchmark: a sequence of domains, the accuracy matrix A[t, i], and baselines in one run."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from model_store.backbone import Backbone
from model_store.bank import BankSnapshot, build_bank, empty_bank
from model_store.bundle import Bundle, read_bundle
from model_store.inference import AUTO, ZERO_SHOT, TextCache
from model_store.reference import find_reference
from model_store.selector import SelectorConfig, fit_selector

from .cl_agnostic import agnostic_of_bank, agnostic_of_model
from .cl_baselines import run_sequential
from .cl_common import (
    BATCH_ROUTED,
    LABEL_ROUTED,
    METHODS,
    TEMPLATE,
    CLConfig,
    RunLog,
    SequenceStep,
    cl_metrics,
    train_cfg,
)
from .data import LabelledImages
from .evaluate import accuracy_and_routes
from .expert_blocks import default_expert_blocks
from .int8_eval import int8_comparison
from .progress import progress_bar
from .scoring import frozen_features
from .trainer import TrainConfig, accuracy, train_task

__all__ = [
    "BATCH_ROUTED",
    "LABEL_ROUTED",
    "METHODS",
    "CLConfig",
    "SequenceStep",
    "cl_metrics",
    "offline_sequence",
    "run_continual",
]

OFFLINE_SEQUENCE = ("sketches", "textures", "arrows", "digits", "glyphs")


def _first(data: LabelledImages, n: int | None) -> LabelledImages:
    return data if n is None or n >= len(data) else data.subset(range(n))  # splits are shuffled: first n is mixed


def offline_sequence(
    names: Sequence[str] = OFFLINE_SEQUENCE, train_limit: int | None = None, test_limit: int | None = None
) -> list[SequenceStep]:
    """Offline domains as a sequence; limits keep the first n images of train and of val/test."""
    from .data import load_domain

    return [
        SequenceStep(
            n,
            _first(load_domain(n, "train"), train_limit),
            _first(load_domain(n, "val"), test_limit),
            _first(load_domain(n, "test"), test_limit),
        )
        for n in names
    ]


# ----------------------------------------------------------------------------------------------- the MoE


def _gaussian_bank(bank: BankSnapshot, gauss: dict[str, Any]) -> BankSnapshot:
    tasks = tuple(dataclasses.replace(t, selector=gauss[t.name]) for t in bank.tasks)
    return dataclasses.replace(bank, tasks=tasks)


def _moe_rows(
    bank: BankSnapshot,
    gbank: BankSnapshot | None,
    seq: Sequence[SequenceStep],
    t: int,
    cfg: CLConfig,
    run: RunLog,
    prefix: str,
    cache: TextCache,
) -> None:
    rows: dict[str, list[float]] = {}
    for i, d in enumerate(seq):
        acc, routes = accuracy_and_routes(bank, d.test, AUTO, cache, templates=d.templates, match_labels=False)
        rows.setdefault(prefix, []).append(acc)
        if t == len(seq) - 1:
            run.routes.setdefault(prefix, {})[d.name] = routes
        if not prefix.startswith("moe-ddas") or prefix == "moe-ddas-warm":
            continue
        oracle = d.name if i <= t else ZERO_SHOT
        oracle_acc = accuracy_and_routes(bank, d.test, oracle, cache, templates=d.templates)[0]
        rows.setdefault(prefix.replace("ddas", "oracle"), []).append(oracle_acc)
        if prefix != "moe-ddas":
            continue
        acc_l, routes_l = accuracy_and_routes(bank, d.test, AUTO, cache, templates=d.templates)
        rows.setdefault(LABEL_ROUTED, []).append(acc_l)
        if t == len(seq) - 1:
            run.routes.setdefault(LABEL_ROUTED, {})[d.name] = routes_l
        acc_b, routes_b = accuracy_and_routes(
            bank, d.test, AUTO, cache, cfg.eval_batch, "per-request", d.templates, match_labels=False
        )
        rows.setdefault(BATCH_ROUTED, []).append(acc_b)
        if t == len(seq) - 1:
            run.routes.setdefault(BATCH_ROUTED, {})[d.name] = routes_b
        if gbank is not None:
            acc_g, routes_g = accuracy_and_routes(gbank, d.test, AUTO, cache, templates=d.templates, match_labels=False)
            rows.setdefault("moe-gauss", []).append(acc_g)
            if t == len(seq) - 1:
                run.routes.setdefault("moe-gauss", {})[d.name] = routes_g
    for method, values in rows.items():
        run.row(method, values)


def _activation_shares(bank: BankSnapshot, bundles: Sequence[Bundle], counts: dict[str, list[int]], task: str):
    """Which task's experts a new task's router picked (top-k choices on a training sample, every block):
    the share of picks per owning task, the new task's own experts under its own name."""
    owner = {eid: b.task for b in bundles for eid in b.experts}
    by_slot = {(tw, bl, s): owner.get(eid, "?") for eid, (tw, bl, s) in bank.expert_ids.items()}
    totals: Counter = Counter()
    for key, per_slot in counts.items():
        tower, block = key.rsplit(".", 1)
        for s, n in enumerate(per_slot):
            totals[by_slot.get((tower, int(block), s), task)] += n
    total = sum(totals.values()) or 1
    return {k: round(v / total, 4) for k, v in sorted(totals.items())}


def _run_moe(
    bb: Backbone,
    seq: Sequence[SequenceStep],
    cfg: CLConfig,
    run: RunLog,
    prefix: str,
    progress: bool,
    **extra: Any,
) -> dict[str, BankSnapshot]:
    """Train the tasks one on top of the other with `extra` TrainConfig settings; after each, fill the rows of
    `prefix` (moe-ddas, its variants, or adapter-ddas). Returns the final banks."""
    bank, bundles, gauss = empty_bank(bb), [], {}
    reference = find_reference(bb)
    cache = TextCache()  # keyed by bundle id: a task's and zero-shot's label sets are encoded once, not once a row
    start = time.perf_counter()
    for t, d in enumerate(progress_bar(seq, desc=prefix, unit="task", disable=not progress)):
        tcfg = train_cfg(cfg, d, t, **extra)
        result = train_task(bank, d.train, tcfg, d.val, progress=progress, reference=reference)
        run.val.setdefault(prefix, {})[d.name] = result.report["val_accuracy"]
        shares = _activation_shares(bank, bundles, result.report["activation_counts"], d.name)
        run.activation.setdefault(prefix, {})[d.name] = shares
        bundles.append(read_bundle(result.bundle))
        bank = build_bank(bb, bundles, previous=bank)
        gbank = None
        if prefix == "moe-ddas" and "moe-gauss" in cfg.methods:
            gcfg = SelectorConfig(kind="gaussian")
            gauss[d.name] = fit_selector(frozen_features(bb, d.train), frozen_features(bb, d.val), gcfg)
            gbank = _gaussian_bank(bank, gauss)
        _moe_rows(bank, gbank, seq, t, cfg, run, prefix, cache)
    run.seconds[prefix] = round(time.perf_counter() - start, 1)
    banks = {prefix: bank, BATCH_ROUTED: bank, LABEL_ROUTED: bank} if prefix == "moe-ddas" else {prefix: bank}
    if gbank is not None:
        banks["moe-gauss"] = gbank
    return banks


# adapter-ddas: one expert per block whose rank is the MoE's new experts' ranks together (the same parameters
# per task, less the router), and a router that sees nothing else, so its gate is always 1
ADAPTER_DDAS = {"new_experts": 1, "rank": TrainConfig.rank * TrainConfig.new_experts, "isolated": True}


def _train_banks(backbone: Backbone, seq: Sequence[SequenceStep], cfg: CLConfig, run: RunLog, progress: bool):
    """Every bank-based method asked for: the main MoE bank (with oracle, per-batch and Gaussian rows), the ATLAS
    warm start, the one-adapter-per-task bank, and each K of the sweep. Returns the banks that route outside."""
    banks: dict[str, BankSnapshot] = {}
    if any(m in cfg.methods for m in ("moe-oracle", "moe-ddas", "moe-gauss")):
        banks.update(_run_moe(backbone, seq, cfg, run, "moe-ddas", progress))
    if "moe-ddas-warm" in cfg.methods:
        warm = int(cfg.steps * cfg.warm_fraction)
        banks.update(_run_moe(backbone, seq, cfg, run, "moe-ddas-warm", progress, warm_start_steps=warm))
    if "adapter-ddas" in cfg.methods:
        banks.update(_run_moe(backbone, seq, cfg, run, "adapter-ddas", progress, **ADAPTER_DDAS))
    for k in cfg.expert_blocks_sweep:
        _run_moe(backbone, seq, cfg, run, f"moe-ddas-k{k}", progress, expert_blocks=k)
    return banks


# ----------------------------------------------------------------------------------------------- metrics


def _routing_summary(run: RunLog, seq: Sequence[SequenceStep], outside: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method, per_domain in run.routes.items():
        fractions = {d: {k: v / sum(c.values()) for k, v in sorted(c.items())} for d, c in per_domain.items()}
        own = sum(per_domain[d.name][d.name] for d in seq)
        total = sum(sum(per_domain[d.name].values()) for d in seq)
        summary = {"task_accuracy": round(own / total, 4), "per_domain": fractions}
        if outside is not None and outside in per_domain:
            c = per_domain[outside]
            summary["zero_shot_fallback"] = round(c[ZERO_SHOT] / sum(c.values()), 4)
        out[method] = summary
    return out


def run_continual(
    backbone: Backbone,
    seq: Sequence[SequenceStep],
    cfg: CLConfig,
    outside: LabelledImages | None = None,
    outside_name: str = "shapes",
    progress: bool = True,
) -> dict[str, Any]:
    """Every method of `cfg.methods` on the same sequence and budget; the report as `report.json` holds it."""
    if len(seq) < 2:
        raise ValueError(f"a continual run needs at least 2 domains, got {len(seq)}")
    run, int8 = RunLog(), None
    start = time.perf_counter()
    zs = [accuracy(backbone.model, backbone, d.test, d.templates, lambda n: None) for d in seq]
    for _ in seq:
        run.row("zero-shot", zs)
    seq_out = list(seq)
    banks = _train_banks(backbone, seq, cfg, run, progress)
    if outside is not None:
        _route_outside(banks, run, outside, outside_name, cfg)
    _agnostic_of_banks(banks, backbone, seq, run)
    if cfg.int8 and "moe-ddas" in banks:
        int8 = int8_comparison(banks["moe-ddas"], seq, outside)
    for method in ("adapter", "finetune"):
        if method in cfg.methods or (method == "finetune" and "wise-ft" in cfg.methods):
            run_sequential(backbone, seq, cfg, run, method, progress)
    keep = [*cfg.methods, BATCH_ROUTED, LABEL_ROUTED] if "moe-ddas" in cfg.methods else list(cfg.methods)
    keep += [f"moe-{kind}-k{k}" for k in cfg.expert_blocks_sweep for kind in ("oracle", "ddas")]
    methods = {m: {"matrix": run.matrices[m], **cl_metrics(run.matrices[m])} for m in keep if m in run.matrices}
    routing = _routing_summary(run, seq_out, outside_name if outside is not None else None)
    report = {
        "domains": [d.name for d in seq],
        "classes": {d.name: list(d.classes) for d in seq},
        "templates": {d.name: list(d.templates) for d in seq},
        "test_images": {d.name: len(d.test) for d in seq},
        "outside": outside_name if outside is not None else None,
        "backbone": backbone.describe(),
        "config": dataclasses.asdict(cfg),
        "methods": methods,
        "routing": routing.get("moe-ddas", {}),
        "routing_by_method": routing,
        "expert_blocks": _expert_block_rows(run, methods, cfg, backbone),
        "val_accuracy": run.val,
        "expert_activation": run.activation,
        "outside_accuracy": run.outside_accuracy,  # % on the outside domain's labels, per bank and zero-shot
        "task_agnostic": {m: v for m, v in run.agnostic.items() if m in keep},  # % right over all classes seen
        "int8": int8,
        "seconds": {**run.seconds, "total": round(time.perf_counter() - start, 1)},
    }
    return report


def _expert_block_rows(run: RunLog, methods: dict[str, Any], cfg: CLConfig, backbone: Backbone) -> list[dict[str, Any]]:
    """Per K of the MoE banks trained (the main one first): Last and Transfer of oracle and routed, and training
    seconds. Routing is the same for every K: the selectors see only the frozen pass."""
    main = cfg.expert_blocks if cfg.expert_blocks is not None else default_expert_blocks(backbone)
    layers = backbone.towers["visual"].layers
    rows = []
    for k, suffix in ((main, ""), *((k, f"-k{k}") for k in cfg.expert_blocks_sweep)):
        oracle, ddas = methods.get(f"moe-oracle{suffix}"), methods.get(f"moe-ddas{suffix}")
        if oracle is None or ddas is None:
            continue
        blocks = layers if k == 0 or k >= layers else k
        rows.append(
            {
                "expert_blocks": blocks,
                "of_layers": layers,
                "oracle_last": oracle["last"],
                "ddas_last": ddas["last"],
                "ddas_transfer": ddas["transfer"],
                "train_seconds": run.seconds.get(f"moe-ddas{suffix}"),
            }
        )
    return rows


def _agnostic_of_banks(
    banks: dict[str, BankSnapshot], backbone: Backbone, seq: Sequence[SequenceStep], run: RunLog
) -> None:
    """Zero-shot's and the final banks' accuracy over the union of all classes (training/cl_agnostic.py)."""
    run.agnostic[ZERO_SHOT] = agnostic_of_model(
        lambda data: accuracy(backbone.model, backbone, data, TEMPLATE, lambda n: None), seq
    )
    for method, bank in banks.items():
        if method == "moe-ddas":
            run.agnostic["moe-oracle"] = agnostic_of_bank(bank, seq, oracle=True)
        if method not in (BATCH_ROUTED, LABEL_ROUTED):  # over the union, every task knows a label: as moe-ddas
            run.agnostic[method] = agnostic_of_bank(bank, seq)


def _route_outside(
    banks: dict[str, BankSnapshot], run: RunLog, outside: LabelledImages, name: str, cfg: CLConfig
) -> None:
    """Where the final banks send images of a domain no task was trained on (the backbone's own), and how many
    of them each bank answers right over the domain's labels, beside zero-shot CLIP: an image a task claims may
    still get the right label from that task's experts, so this is the zero-shot skill the bank keeps."""
    cache = TextCache()
    for method, bank in banks.items():
        batch, route = (cfg.eval_batch, "per-request") if method == BATCH_ROUTED else (128, "per-image")
        routed = accuracy_and_routes(bank, outside, AUTO, cache, batch, route, match_labels=method == LABEL_ROUTED)
        acc, run.routes.setdefault(method, {})[name] = routed
        run.outside_accuracy[method] = round(100 * acc, 2)
        if ZERO_SHOT not in run.outside_accuracy:
            run.outside_accuracy[ZERO_SHOT] = round(100 * accuracy_and_routes(bank, outside, ZERO_SHOT, cache)[0], 2)

"""Continual-learning benchmark: a sequence of domains, the accuracy matrix A[t, i], and baselines in one run."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model_store.backbone import TOWERS, Backbone
from model_store.bank import BankSnapshot, build_bank, empty_bank
from model_store.bundle import read_bundle
from model_store.experts import MoEConfig, Routing, TaskRouter, new_expert
from model_store.inference import AUTO, ZERO_SHOT, TextCache
from model_store.reference import find_reference
from model_store.selector import SelectorConfig, fit_selector

from .data import LabelledImages
from .evaluate import accuracy_and_routes
from .expert_blocks import default_expert_blocks
from .int8_eval import int8_comparison
from .trainer import TrainConfig, accuracy, default_lr, fit_steps, frozen_features, train_task

METHODS = ("zero-shot", "finetune", "adapter", "moe-oracle", "moe-ddas", "moe-gauss", "moe-ddas-warm")
BATCH_ROUTED = "moe-ddas-batch"  # the paper's per-batch routing, reported beside the per-image one
TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class SequenceStep:
    """One step of the sequence: a task name and its labelled splits."""

    name: str
    train: LabelledImages
    val: LabelledImages
    test: LabelledImages

    @property
    def classes(self) -> tuple[str, ...]:
        return self.test.classes


@dataclass(frozen=True)
class CLConfig:
    steps: int = 300  # per task, for every trained method alike
    batch_size: int = 64
    methods: tuple[str, ...] = METHODS
    warm_fraction: float = 0.3  # moe-ddas-warm: this share of the steps trains only the router (ATLAS stage 1)
    finetune_lr: float | None = None  # None: a tenth of the adapters' default (1e-3 tiny, 1e-4 wide)
    eval_batch: int = 32  # images per batch for the per-batch routing
    seed: int = 0
    expert_blocks: int | None = None  # K of the MoE methods' bank (None: the trainer's default)
    # more values of K, each training a bank of its own, reported as moe-ddas-k{K} and moe-oracle-k{K}
    expert_blocks_sweep: tuple[int, ...] = ()
    int8: bool = True  # also evaluate the final moe-ddas bank with the int8 frozen image pass (training/int8_eval.py)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        problems = [f"unknown methods {unknown}; known: {', '.join(METHODS)}"] if unknown else []
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if not 0 <= self.warm_fraction < 1:
            problems.append(f"warm_fraction must be in [0, 1), got {self.warm_fraction}")
        if any(k < 0 for k in (*self.expert_blocks_sweep, self.expert_blocks or 0)):
            problems.append("expert_blocks must be >= 0 (0: every block)")
        if problems:
            raise ValueError("invalid CLConfig: " + "; ".join(problems))


@dataclass
class _Run:
    """What a run accumulates: per method, rows of the accuracy matrix; routing counts; timings."""

    matrices: dict[str, list[list[float]]] = field(default_factory=dict)
    routes: dict[str, dict[str, Counter]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    val: dict[str, dict[str, float]] = field(default_factory=dict)

    def row(self, method: str, values: list[float]) -> None:
        self.matrices.setdefault(method, []).append(values)


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


def _train_cfg(cfg: CLConfig, domain: SequenceStep, t: int, **kw: Any) -> TrainConfig:
    kw.setdefault("expert_blocks", cfg.expert_blocks)
    return TrainConfig(task=domain.name, steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed + t, **kw)


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
    run: _Run,
    prefix: str,
) -> None:
    cache = TextCache()
    rows: dict[str, list[float]] = {}
    for i, d in enumerate(seq):
        acc, routes = accuracy_and_routes(bank, d.test, AUTO, cache)
        rows.setdefault(prefix, []).append(acc)
        if t == len(seq) - 1:
            run.routes.setdefault(prefix, {})[d.name] = routes
        if not prefix.startswith("moe-ddas") or prefix == "moe-ddas-warm":
            continue
        oracle = d.name if i <= t else ZERO_SHOT
        oracle_acc = accuracy_and_routes(bank, d.test, oracle, cache)[0]
        rows.setdefault(prefix.replace("ddas", "oracle"), []).append(oracle_acc)
        if prefix != "moe-ddas":
            continue
        acc_b, routes_b = accuracy_and_routes(bank, d.test, AUTO, cache, cfg.eval_batch, "per-request")
        rows.setdefault(BATCH_ROUTED, []).append(acc_b)
        if t == len(seq) - 1:
            run.routes.setdefault(BATCH_ROUTED, {})[d.name] = routes_b
        if gbank is not None:
            acc_g, routes_g = accuracy_and_routes(gbank, d.test, AUTO, cache)
            rows.setdefault("moe-gauss", []).append(acc_g)
            if t == len(seq) - 1:
                run.routes.setdefault("moe-gauss", {})[d.name] = routes_g
    for method, values in rows.items():
        run.row(method, values)


def _run_moe(
    bb: Backbone,
    seq: Sequence[SequenceStep],
    cfg: CLConfig,
    run: _Run,
    warm: bool,
    progress: bool,
    expert_blocks: int | None = None,
) -> dict[str, BankSnapshot]:
    """Train the tasks one on top of the other; after each, fill the MoE rows. Returns the final banks.
    `expert_blocks`: a K of the sweep (rows moe-ddas-k{K} and moe-oracle-k{K}) instead of the main bank."""
    prefix = "moe-ddas-warm" if warm else "moe-ddas" if expert_blocks is None else f"moe-ddas-k{expert_blocks}"
    bank, bundles, gauss = empty_bank(bb), [], {}
    reference = find_reference(bb)
    start = time.perf_counter()
    for t, d in enumerate(tqdm(seq, desc=prefix, unit="task", disable=not progress)):
        extra: dict[str, Any] = {"warm_start_steps": int(cfg.steps * cfg.warm_fraction)} if warm else {}
        if expert_blocks is not None:
            extra["expert_blocks"] = expert_blocks
        tcfg = _train_cfg(cfg, d, t, **extra)
        result = train_task(bank, d.train, tcfg, d.val, progress=progress, reference=reference)
        run.val.setdefault(prefix, {})[d.name] = result.report["val_accuracy"]
        bundles.append(read_bundle(result.bundle))
        bank = build_bank(bb, bundles, previous=bank)
        gbank = None
        if prefix == "moe-ddas" and "moe-gauss" in cfg.methods:
            gcfg = SelectorConfig(kind="gaussian")
            gauss[d.name] = fit_selector(frozen_features(bb, d.train), frozen_features(bb, d.val), gcfg)
            gbank = _gaussian_bank(bank, gauss)
        _moe_rows(bank, gbank, seq, t, cfg, run, prefix)
    run.seconds[prefix] = round(time.perf_counter() - start, 1)
    banks = {prefix: bank, BATCH_ROUTED: bank}
    if gbank is not None:
        banks["moe-gauss"] = gbank
    return banks


# ----------------------------------------------------------------------------------------------- baselines


def _shared_adapter(bb: Backbone, cfg: CLConfig) -> tuple[Callable[[int, bool], Routing], torch.nn.ParameterList]:
    """One expert per block and tower that every sample goes through (gate 1): a plain sequential adapter."""
    g = torch.Generator().manual_seed(cfg.seed)
    experts, weights, slots = {}, {}, {}
    for tower in TOWERS:
        spec = bb.towers[tower]
        experts[tower] = [[new_expert(spec.width, 64, g)] for _ in range(spec.layers)]
        weights[tower] = [torch.zeros(1, spec.width, device=bb.device) for _ in range(spec.layers)]
        slots[tower] = [torch.zeros(1, dtype=torch.long, device=bb.device) for _ in range(spec.layers)]
    params = torch.nn.ParameterList([p for blocks in experts.values() for (e,) in blocks for p in e.parts().values()])
    params.to(bb.device)  # moves each parameter's data in place, so the experts see it
    router = TaskRouter(weights, slots)

    def routing(n: int, training: bool) -> Routing:
        idx = torch.zeros(n, dtype=torch.long, device=bb.device)
        return Routing(experts, [router], idx, MoEConfig(), training)

    return routing, params


def _run_sequential(
    bb: Backbone, seq: Sequence[SequenceStep], cfg: CLConfig, run: _Run, method: str, progress: bool
) -> None:
    """`finetune` (every weight but logit_scale) or `adapter` (one shared adapter), trained task after task."""
    start = time.perf_counter()
    if method == "finetune":
        model = copy.deepcopy(bb.model)
        params = [p for n, p in model.named_parameters() if n != "logit_scale"]
        for p in params:
            p.requires_grad_(True)
        lr = cfg.finetune_lr or default_lr(bb) / 10

        def routing(n: int, training: bool) -> None:
            return None
    else:
        model, lr = bb.model, None
        routing, params = _shared_adapter(bb, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    for t, d in enumerate(tqdm(seq, desc=method, unit="task", disable=not progress)):
        torch.manual_seed(cfg.seed + t)
        tcfg = _train_cfg(cfg, d, t)
        fit_steps(model, bb, d.train, tcfg, params, lambda n, step: routing(n, True), g, progress, peak_lr=lr)
        run.val.setdefault(method, {})[d.name] = accuracy(model, bb, d.val, TEMPLATE, lambda n: routing(n, False))
        run.row(method, [accuracy(model, bb, e.test, TEMPLATE, lambda n: routing(n, False)) for e in seq])
    run.seconds[method] = round(time.perf_counter() - start, 1)


# ----------------------------------------------------------------------------------------------- metrics


def cl_metrics(matrix: Sequence[Sequence[float]]) -> dict[str, float]:
    """docs/benchmarks/cl.md's metrics on A[t, i] (fractions), in points: Transfer, Avg, Last, and forgetting.

    Forgetting is the largest drop, over tasks, from a task's best accuracy once learned to its final one.
    """
    a = np.asarray(matrix, dtype=float) * 100
    n = a.shape[0]
    transfer = float(np.mean([a[:i, i].mean() for i in range(1, n)])) if n > 1 else float("nan")
    forgetting = max(float(a[i:, i].max() - a[-1, i]) for i in range(n))
    return {
        "transfer": round(transfer, 2),
        "avg": round(float(a.mean()), 2),
        "last": round(float(a[-1].mean()), 2),
        "forgetting": round(forgetting, 2),
    }


def _routing_summary(run: _Run, seq: Sequence[SequenceStep], outside: str | None) -> dict[str, Any]:
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
    run, int8 = _Run(), None
    start = time.perf_counter()
    zs = [accuracy(backbone.model, backbone, d.test, TEMPLATE, lambda n: None) for d in seq]
    for _ in seq:
        run.row("zero-shot", zs)
    seq_out = list(seq)
    if any(m.startswith("moe-") and m != "moe-ddas-warm" for m in cfg.methods):
        banks = _run_moe(backbone, seq, cfg, run, warm=False, progress=progress)
        if outside is not None:
            _route_outside(banks, run, outside, outside_name, cfg)
        if cfg.int8 and "moe-ddas" in banks:
            int8 = int8_comparison(banks["moe-ddas"], seq, outside)
    if "moe-ddas-warm" in cfg.methods:
        _run_moe(backbone, seq, cfg, run, warm=True, progress=progress)
    for k in cfg.expert_blocks_sweep:
        _run_moe(backbone, seq, cfg, run, warm=False, progress=progress, expert_blocks=k)
    for method in ("adapter", "finetune"):
        if method in cfg.methods:
            _run_sequential(backbone, seq, cfg, run, method, progress)
    keep = [*cfg.methods, BATCH_ROUTED] if "moe-ddas" in cfg.methods else list(cfg.methods)
    keep += [f"moe-{kind}-k{k}" for k in cfg.expert_blocks_sweep for kind in ("oracle", "ddas")]
    methods = {m: {"matrix": run.matrices[m], **cl_metrics(run.matrices[m])} for m in keep if m in run.matrices}
    routing = _routing_summary(run, seq_out, outside_name if outside is not None else None)
    report = {
        "domains": [d.name for d in seq],
        "classes": {d.name: list(d.classes) for d in seq},
        "test_images": {d.name: len(d.test) for d in seq},
        "outside": outside_name if outside is not None else None,
        "backbone": backbone.describe(),
        "config": dataclasses.asdict(cfg),
        "methods": methods,
        "routing": routing.get("moe-ddas", {}),
        "routing_by_method": routing,
        "expert_blocks": _expert_block_rows(run, methods, cfg, backbone),
        "val_accuracy": run.val,
        "int8": int8,
        "seconds": {**run.seconds, "total": round(time.perf_counter() - start, 1)},
    }
    return report


def _expert_block_rows(run: _Run, methods: dict[str, Any], cfg: CLConfig, backbone: Backbone) -> list[dict[str, Any]]:
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


def _route_outside(
    banks: dict[str, BankSnapshot], run: _Run, outside: LabelledImages, name: str, cfg: CLConfig
) -> None:
    """Where the final banks send images of a domain no task was trained on (the backbone's own)."""
    cache = TextCache()
    for method, bank in banks.items():
        batch, route = (cfg.eval_batch, "per-request") if method == BATCH_ROUTED else (128, "per-image")
        run.routes.setdefault(method, {})[name] = accuracy_and_routes(bank, outside, AUTO, cache, batch, route)[1]

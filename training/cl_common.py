"""What the continual-learning benchmark's parts share: its configuration, a sequence step, the run's log, and
the metrics of an accuracy matrix."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model_store.selector import SelectorConfig

from .data import LabelledImages
from .trainer import TrainConfig

METHODS = (
    "zero-shot",
    "finetune",
    "wise-ft",
    "adapter",
    "adapter-ddas",
    "moe-oracle",
    "moe-ddas",
    "moe-gauss",
    "moe-ddas-warm",
)
# the default run's methods: `adapter` (one shared adapter) and `moe-ddas-warm` (ATLAS's stage 1) lost clearly in
# every earlier run (docs/benchmarks/cl.md) and are run only when asked for
DEFAULT_METHODS = tuple(m for m in METHODS if m not in ("adapter", "moe-ddas-warm"))
BATCH_ROUTED = "moe-ddas-batch"  # the paper's per-batch routing, reported beside the per-image one
# moe-ddas as served by default: each image sent with its own task's labels, which only tasks that know one of
# them may claim (label-aware routing, docs/method.md); moe-ddas itself is the selectors alone
LABEL_ROUTED = "moe-ddas-labels"
TEMPLATE = "a photo of a {}."


def comma_names(text: str | None) -> tuple[str, ...]:
    """`a,b,` as ("a", "b"): names of a comma-separated flag, spaces and empty entries (a trailing comma) dropped."""
    return tuple(n.strip() for n in (text or "").split(",") if n.strip())


@dataclass(frozen=True)
class SequenceStep:
    """One step of the sequence: a task name, its labelled splits, and the prompts its labels are scored with
    (every method alike, and its bundle's; the real protocols' papers use per-dataset ensembles)."""

    name: str
    train: LabelledImages
    val: LabelledImages
    test: LabelledImages
    templates: tuple[str, ...] = (TEMPLATE,)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.test.classes


@dataclass(frozen=True)
class CLConfig:
    steps: int = 300  # per task, for every trained method alike
    batch_size: int = 64
    methods: tuple[str, ...] = DEFAULT_METHODS
    warm_fraction: float = 0.3  # moe-ddas-warm: this share of the steps trains only the router (ATLAS stage 1)
    finetune_lr: float | None = None  # None: a tenth of the adapters' default (1e-3 tiny, 1e-4 wide)
    wise_alpha: float = 0.5  # wise-ft: the fine-tuned weights' share in the interpolation (WiSE-FT's default)
    eval_batch: int = 32  # images per batch for the per-batch routing
    seed: int = 0
    expert_blocks: int | None = None  # K of the MoE methods' bank (None: the trainer's default)
    # more values of K, each training a bank of its own, reported as moe-ddas-k{K} and moe-oracle-k{K}
    expert_blocks_sweep: tuple[int, ...] = ()
    distill: float = 0.0  # class-incremental: TrainConfig.distill of each new version (LwF from its parent)
    int8: bool = True  # also evaluate the final moe-ddas bank with the int8 frozen image pass (training/int8_eval.py)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        problems = [f"unknown methods {unknown}; known: {', '.join(METHODS)}"] if unknown else []
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if not 0 < self.wise_alpha <= 1:
            problems.append(f"wise_alpha must be in (0, 1], got {self.wise_alpha}")
        if not 0 <= self.warm_fraction < 1:
            problems.append(f"warm_fraction must be in [0, 1), got {self.warm_fraction}")
        if any(k < 0 for k in (*self.expert_blocks_sweep, self.expert_blocks or 0)):
            problems.append("expert_blocks must be >= 0 (0: every block)")
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))


@dataclass
class RunLog:
    """What a run accumulates: per method, rows of the accuracy matrix; routing counts; timings."""

    matrices: dict[str, list[list[float]]] = field(default_factory=dict)
    routes: dict[str, dict[str, Counter]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    val: dict[str, dict[str, float]] = field(default_factory=dict)
    activation: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # method -> task -> owner share
    outside_accuracy: dict[str, float] = field(default_factory=dict)  # method (and zero-shot) -> % on the outside
    agnostic: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> final accuracy over all classes

    def row(self, method: str, values: list[float]) -> None:
        self.matrices.setdefault(method, []).append(values)


def train_cfg(cfg: CLConfig, domain: SequenceStep, t: int, **kw: Any) -> TrainConfig:
    """Task t's training settings; its seed (the run's plus t) seeds its selector too, so seeds vary routing."""
    kw.setdefault("expert_blocks", cfg.expert_blocks)
    kw.setdefault("templates", domain.templates)
    kw.setdefault("selector", SelectorConfig(seed=cfg.seed + t))
    return TrainConfig(task=domain.name, steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed + t, **kw)


def cl_metrics(matrix: Sequence[Sequence[float]]) -> dict[str, float]:
    """docs/benchmarks/cl.md's metrics on A[t, i] (fractions), in points: Transfer, Avg, Last, and forgetting.

    Forgetting is the largest drop, over tasks, from a task's best accuracy once learned to its final one.
    Learned is the mean over tasks of a task's accuracy right after it is learned (the diagonal): plasticity.
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
        "learned": round(float(np.diag(a).mean()), 2),
    }

"""Train one task's new experts and router on top of a frozen bank, fit its selector, and pack the bundle."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from model_store.backbone import TOWERS, Backbone
from model_store.bank import BankSnapshot
from model_store.bundle import PlacedExpert, pack_bundle, utc_now
from model_store.experts import ActivationCounts, Expert, Routing, TaskRouter, expert_id, new_expert
from model_store.labels import MAX_TEMPLATES, template_ok
from model_store.manifest import task_name_problem
from model_store.moe_clip import encode_image, encode_text
from model_store.reference import ReferenceSet, find_reference
from model_store.selector import Selector, SelectorConfig, selector_manifest
from model_store.settings import field_type_problems

from .config import jsonable
from .data import LabelledImages, checked_split
from .expert_blocks import with_expert_blocks
from .lineage import with_parent_classes
from .lwf import parent_teacher
from .progress import phases, progress_bar
from .routing import selector_with_routing
from .scoring import accuracy  # noqa: F401 - the CL benchmarks import it from here
from .validation import evaluate, share, validated

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """One task's training run: the defaults of docs/method.md (Training), with a step budget sized for a CPU."""

    task: str
    steps: int = 500
    batch_size: int = 64
    lr: float | None = None  # None: 1e-2 for narrow backbones (width <= 256, the tiny one), else the paper's 1e-3
    warmup: int = 100  # capped at a tenth of the steps
    new_experts: int = 2
    label_smoothing: float = 0.2
    template: str = "a photo of a {}."  # the training loss's prompt (METHOD.md: one template)
    templates: tuple[str, ...] = ()  # the bundle's prompt ensemble: validation and serving; (): (template,)
    warm_start_steps: int = 0  # ATLAS stage 1: router-only steps over the existing experts
    new_first: float = 3.0  # the router starts preferring the new experts by this logit margin (0: zero init)
    val_fraction: float = 0.2  # held out of the training set when no validation set is given
    seed: int = 0
    rank: int = 64  # of the new experts; top-k, scale, dropout and noise are the bank's MoEConfig
    isolated: bool = False  # the router sees only the new experts: with new_experts=1, one adapter per task
    distill: float = 0.0  # a new version: weight of keeping its parent's answers on old classes (lwf.py; lost: off)
    # K: new experts only in the top K blocks of each tower (0: every block); None: the bank's, or for a bank's
    # first task default_expert_blocks. Every task of a bank has the same K.
    expert_blocks: int | None = None
    selector: SelectorConfig = field(default_factory=SelectorConfig)

    def __post_init__(self) -> None:
        if isinstance(self.selector, str):  # a kind's name, as `clipbank train --selector gaussian` takes it
            object.__setattr__(self, "selector", SelectorConfig(kind=self.selector))
        problems = field_type_problems(self)  # first: the ranges below compare (lr="0.01" failed in a comparison)
        if not isinstance(self.selector, SelectorConfig):  # was an AttributeError after all the steps had run
            problems.append(f"selector is a SelectorConfig or a kind's name, got {type(self.selector).__name__}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))
        problems = [problem] if (problem := task_name_problem(self.task)) else []
        if self.expert_blocks is not None and self.expert_blocks < 0:
            problems.append(f"expert_blocks must be >= 0 (0: every block), got {self.expert_blocks}")
        for name in ("steps", "batch_size", "new_experts", "rank", "warmup", "seed"):
            value, least = getattr(self, name), 0 if name in ("warmup", "seed") else 1
            if value < least:
                problems.append(f"{name} must be >= {least}, got {value}")
        if not 0 <= self.label_smoothing < 1:  # also refuses NaN, which failed only when the bundle was packed
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if isinstance(self.templates, str):
            problems.append(f"templates is a tuple of templates, got the string {self.templates!r:.60}")
        if not 0 <= self.new_first < math.inf:
            problems.append(f"new_first must be a finite number >= 0, got {self.new_first}")
        if self.lr is not None and not 0 < self.lr < math.inf:  # also refuses NaN
            problems.append(f"lr must be a finite number > 0, got {self.lr}")
        if len(self.templates) > MAX_TEMPLATES:
            problems.append(f"at most {MAX_TEMPLATES} templates, got {len(self.templates)}")
        for t in (self.template, *(() if isinstance(self.templates, str) else self.templates)):
            if not template_ok(t):
                problems.append(f"templates must contain exactly one '{{}}' and no other field, got {t!r}")
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 <= self.warm_start_steps < max(1, self.steps):  # steps < 1 is named above
            problems.append(f"warm_start_steps must be in [0, steps), got {self.warm_start_steps}")
        if not 0 <= self.distill < math.inf:
            problems.append(f"distill must be a finite number >= 0, got {self.distill}")
        if self.isolated and self.warm_start_steps:
            problems.append("warm_start_steps trains the router over the bank's experts, which isolated excludes")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    @property
    def serving_templates(self) -> tuple[str, ...]:
        return self.templates or (self.template,)


@dataclass
class TrainResult:
    bundle: bytes
    report: dict[str, Any]


class _StreamProbe:
    """Stands in for a Routing: records each block's mean token-0 stream and adds nothing (the frozen pass)."""

    def __init__(self) -> None:
        self.means: dict[tuple[str, int], torch.Tensor] = {}

    def covers(self, tower: str, block: int) -> bool:
        return True

    def branch(self, tower: str, block: int, h: torch.Tensor) -> torch.Tensor:
        self.means[(tower, block)] = h[:, 0].mean(0)
        return torch.zeros_like(h)


class _TaskParams(torch.nn.Module):
    """The only trainable state: the new experts, the new router and its noise weights."""

    def __init__(self, bank: BankSnapshot, cfg: TrainConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.new: dict[str, list[list[Expert]]] = {}
        self.router = torch.nn.ParameterDict()
        self.noise = torch.nn.ParameterDict()
        params = []
        for tower in TOWERS:
            spec = bank.backbone.towers[tower]
            self.new[tower] = []
            first = bank.config.first_block(spec.layers)  # below it, no experts (the shared frozen prefix)
            for i in range(spec.layers):
                count = cfg.new_experts if i >= first else 0
                experts = [new_expert(spec.width, cfg.rank, generator) for _ in range(count)]
                self.new[tower].append(experts)
                params += [p for e in experts for p in e.parts().values()]
                n = count if cfg.isolated else len(bank.experts[tower][i]) + count
                self.router[f"{tower}_{i}"] = torch.nn.Parameter(torch.zeros(n, spec.width))
                self.noise[f"{tower}_{i}"] = torch.nn.Parameter(torch.zeros(n, spec.width))
        self.expert_params = torch.nn.ParameterList(params)
        self.isolated = cfg.isolated
        self.to(bank.backbone.device)

    def prefer_new(self, bank: BankSnapshot, data: LabelledImages, cfg: TrainConfig) -> None:
        """Set the new experts' router rows so that, on the task's mean token-0 stream, they score
        `cfg.new_first` above the bank's experts (which score 0). Training then starts on the new experts
        instead of spending its first steps on frozen ones, and may still bring old ones in."""
        bb = bank.backbone
        probe = _StreamProbe()
        with torch.no_grad():
            pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))[:128].tolist()
            x = torch.stack([bb.preprocess(data.images[i]) for i in pick]).to(bb.device)  # all classes, not the first
            encode_image(bb.model, x, probe)
            encode_text(bb.model, bb.tokenizer([cfg.template.format(c) for c in data.classes]).to(bb.device), probe)
            for (tower, block), m in probe.means.items():
                w, count = self.router[f"{tower}_{block}"], len(self.new[tower][block])
                if count:
                    w[-count:] = cfg.new_first * m / m.dot(m).clamp_min(1e-6)

    def routing(
        self, bank: BankSnapshot, n: int, training: bool, stage1: bool = False, counts: ActivationCounts | None = None
    ) -> Routing:
        experts, weights, slots, noise, allowed = {}, {}, {}, {}, {}
        dev = bank.backbone.device
        for tower in TOWERS:
            experts[tower] = [tuple(bank.experts[tower][i]) + tuple(new) for i, new in enumerate(self.new[tower])]
            weights[tower] = [self.router[f"{tower}_{i}"] for i in range(len(experts[tower]))]
            noise[tower] = [self.noise[f"{tower}_{i}"] for i in range(len(experts[tower]))]
            old = [len(b) if self.isolated else 0 for b in bank.experts[tower]]  # isolated: the new experts only
            slots[tower] = [torch.arange(o, len(e), device=dev) for o, e in zip(old, experts[tower], strict=True)]
            allowed[tower] = [
                torch.arange(len(e), device=dev) < len(bank.experts[tower][i]) for i, e in enumerate(experts[tower])
            ]
        router = TaskRouter(weights, slots, noise if training else None, allowed if stage1 else None)
        return Routing(experts, [router], torch.zeros(n, dtype=torch.long, device=dev), bank.config, training, counts)


def default_lr(backbone: Backbone) -> float:
    """The paper's 1e-3 at ViT-B/16; narrow backbones need larger steps to move their adapters in a short run."""
    return 1e-2 if backbone.narrow else 1e-3


def _lr_at(step: int, cfg: TrainConfig, peak: float) -> float:
    warmup = min(cfg.warmup, max(1, cfg.steps // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))


def fit_steps(
    model: Any,
    backbone: Backbone,
    data: LabelledImages,
    cfg: TrainConfig,
    parameters: Iterable[torch.nn.Parameter],
    routing_for: Callable[[int, int], Routing | None],
    generator: torch.Generator,
    progress: bool,
    peak_lr: float | None = None,
    extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> list[float]:
    """The task loss (plus `extra_loss(images, logits)`), minimised over `parameters` for `cfg.steps` AdamW steps;
    `routing_for(batch, step)`."""
    dev = backbone.device
    tokens = backbone.tokenizer([cfg.template.format(c) for c in data.classes]).to(dev)
    labels = torch.tensor(data.labels)
    peak = peak_lr or cfg.lr or default_lr(backbone)
    opt = torch.optim.AdamW(list(parameters), lr=peak, betas=(0.9, 0.999), weight_decay=0.0)
    losses = []
    bar = progress_bar(range(cfg.steps), desc=f"train {cfg.task}", unit="step", disable=not progress, leave=False)
    for step in bar:
        idx = torch.randint(len(data), (min(cfg.batch_size, len(data)),), generator=generator)
        x = torch.stack([backbone.train_preprocess(data.images[i]) for i in idx]).to(dev)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg, peak)
        img = encode_image(model, x, routing_for(len(x), step))
        txt = encode_text(model, tokens, routing_for(len(tokens), step))
        logits = model.logit_scale.exp() * img @ txt.T
        loss = F.cross_entropy(logits, labels[idx].to(dev), label_smoothing=cfg.label_smoothing)
        loss = loss + extra_loss(x, logits) if extra_loss is not None else loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):  # every later step would be nan too, and the bundle unservable
            raise ValueError(
                f"training diverged: the loss is {losses[-1]} at step {step + 1} of task {cfg.task!r}; "
                f"lower the learning rate (peak {peak:g})"
            )
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return losses


def _train_loop(
    bank: BankSnapshot,
    params: _TaskParams,
    data: LabelledImages,
    cfg: TrainConfig,
    generator: torch.Generator,
    progress: bool,
) -> list[float]:
    stage1 = cfg.warm_start_steps if any(len(b) >= bank.config.top_k for b in bank.experts["visual"]) else 0

    def routing_for(n: int, step: int) -> Routing:
        return params.routing(bank, n, True, stage1=step < stage1)

    bb, teacher = bank.backbone, parent_teacher(bank, cfg.task, data.classes, cfg.distill)
    extra = teacher.loss if teacher is not None else None
    return fit_steps(bb.model, bb, data, cfg, params.parameters(), routing_for, generator, progress, extra_loss=extra)


def _publish(bank: BankSnapshot, params: _TaskParams) -> tuple[dict[str, PlacedExpert], dict, dict]:
    """Freeze the new experts into content-addressed ids and the routing table that names them."""
    experts: dict[str, PlacedExpert] = {}
    routing: dict[str, Any] = {"top_k": bank.config.top_k, "scale": bank.config.scale}
    routers: dict[str, list[torch.Tensor]] = {}
    by_slot = {(tw, bl, s): eid for eid, (tw, bl, s) in bank.expert_ids.items()}
    for tower in TOWERS:
        routing[tower], routers[tower] = [], []
        for i, new in enumerate(params.new[tower]):
            old = 0 if params.isolated else len(bank.experts[tower][i])
            ids = [by_slot[(tower, i, s)] for s in range(old)]
            for e in new:
                frozen = Expert.from_parts({k: v.detach().cpu().clone() for k, v in e.parts().items()})
                eid = expert_id(frozen.parts())
                experts[eid] = PlacedExpert(tower, i, frozen)
                ids.append(eid)
            routing[tower].append(ids)
            routers[tower].append(params.router[f"{tower}_{i}"].detach().cpu().clone())
    return experts, routing, routers


def pack_task(
    bank: BankSnapshot,
    cfg: TrainConfig,
    classes: Sequence[str],
    params: _TaskParams,
    selector: Selector,
    report: dict[str, Any],
    version: int = 1,
    parent: str | None = None,
    probes: torch.Tensor | None = None,
) -> bytes:
    """The bundle of a task's new experts and router (`params`), its selector and probes, on top of `bank`."""
    experts, routing, routers = _publish(bank, params)
    manifest = {
        "task": cfg.task,
        "version": version,
        "created_at": utc_now(),
        "backbone": bank.backbone.describe(),
        "classes": list(classes),
        "templates": list(cfg.serving_templates),
        "experts": {"uses": sorted({e for t in TOWERS for ids in routing[t] for e in ids} - set(experts))},
        "routing": routing,
        "selector": selector_manifest(selector, cfg.selector),
        "training": report,
        "parent": parent,
        "moe": replace(bank.config, rank=cfg.rank).to_json(),
    }
    return pack_bundle(manifest, experts, routers, selector.tensors(), probes)


def _reference(bank: BankSnapshot, reference: ReferenceSet | None | str) -> ReferenceSet | None:
    """`train_task`'s reference set: "auto" is the backbone's own, as `clipbank train` finds it."""
    if not isinstance(reference, str):
        return reference
    if reference != "auto":
        raise ValueError(f"reference is a ReferenceSet, None or 'auto', got {reference!r}")
    return find_reference(bank.backbone)


def train_task(
    bank: BankSnapshot,
    train: LabelledImages,
    cfg: TrainConfig,
    val: LabelledImages | None = None,
    version: int = 1,
    parent: str | None = None,
    progress: bool = True,
    reference: ReferenceSet | None | str = "auto",
    parent_classes: Sequence[str] | None = None,
) -> TrainResult:
    """Train task `cfg.task` on top of `bank` (its experts stay frozen) and return the packed bundle.

    The selector learns from `reference` (generic outside images for this backbone; "auto": the backbone's own,
    as `clipbank train` finds it; None: none) and the bank's other tasks' probes what is *not* the task; the
    report's `routing` says what routing will do, and `warnings` every warning of the run.

    A new version of a task names its `parent` (the bundle id of the version it follows, as `clipbank train
    --store` finds it) and answers over the parent's classes followed by the data's new ones: `parent_classes`,
    else those of the bank's task whose bundle `parent` is."""
    if not isinstance(cfg, TrainConfig):  # a dict failed with an AttributeError
        raise TypeError(f"train_task's cfg is a TrainConfig(task=..., steps=...), got {type(cfg).__name__}")
    train, val, class_warnings = with_parent_classes(bank, cfg.task, train, val, version, parent, parent_classes)
    reference = _reference(bank, reference)
    fit, val = checked_split(train, val, cfg, bank.backbone)
    bank = with_expert_blocks(bank, cfg.expert_blocks)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    zero_shot = share(evaluate(bank, None, val, cfg.serving_templates))
    params = _TaskParams(bank, cfg, g)
    if cfg.new_first > 0:
        params.prefer_new(bank, fit, cfg)
    losses = _train_loop(bank, params, fit, cfg, g, progress)
    train_seconds = time.time() - t0
    with phases((f"validate {cfg.task}", f"fit the selector of {cfg.task}"), progress) as next_phase:
        counts, figures = validated(bank, params, fit, val, cfg, zero_shot)
        next_phase()
        args = (bank, cfg.task, cfg.selector, cfg.seed, (fit, val), reference, version)
        selector, routing, probes = selector_with_routing(*args)
    for warning in routing["warnings"]:
        log.warning("task %s routing: %s", cfg.task, warning)
    report = {
        "config": jsonable(asdict(cfg)),
        "lr": cfg.lr or default_lr(bank.backbone),
        "steps": cfg.steps,
        "seconds": round(train_seconds, 2),
        "train_images": len(fit),
        "train_classes": len(set(fit.labels)),  # below len(classes): a new version without its parent's images
        "val_images": len(val),
        "zero_shot_val_accuracy": zero_shot,
        **figures,
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "activation_counts": counts,
        "routing": routing,
    }
    data = pack_task(bank, cfg, train.classes, params, selector, report, version, parent, probes)
    got = figures["val_accuracy"]
    log.info("task %s v%d: zero-shot %.3f -> trained %.3f in %.1fs", cfg.task, version, zero_shot, got, train_seconds)
    return _result(data, report, train.classes, class_warnings, selector_manifest(selector, cfg.selector), params)


def _result(
    data: bytes, report: dict, classes: Sequence[str], warnings: list[str], selector: dict, params: _TaskParams
) -> TrainResult:
    """The bundle and its report: the run's figures, its classes, every warning of it (the parent's classes',
    validation's, routing's: a Python caller found them in three places), and the selector's manifest."""
    added = sum(len(new) for blocks in params.new.values() for new in blocks)
    warnings = warnings + report["val_warnings"] + report["routing"]["warnings"]
    extra = {"classes": list(classes), "warnings": warnings, "selector": selector, "bundle_bytes": len(data)}
    return TrainResult(data, {**report, **extra, "experts_added": added})

"""The bank: an immutable snapshot of backbone, published experts and each task's active routers and selector."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any

import torch

from .backbone import TOWERS, Backbone
from .bundle import Bundle, PlacedExpert
from .compat import check_compatible, check_config
from .errors import MissingExpert, TaskDegraded, TaskNotFound
from .experts import Expert, MoEConfig, Routing, TaskRouter
from .labels import label_key
from .manifest import Manifest, shown
from .modes import AUTO, ZERO_SHOT
from .selector import Selector, load_selector
from .selector_stack import SelectorStack


@dataclass(frozen=True)
class TaskEntry:
    """One task's active version, ready to route."""

    name: str
    version: int
    bundle_id: str
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    router: TaskRouter = field(repr=False)
    selector: Selector = field(repr=False)
    manifest: Manifest = field(repr=False)
    file_bytes: int  # of the bundle file
    probes: torch.Tensor | None = field(default=None, repr=False)  # on the CPU: a sample of the task's held-out
    # embeddings (training reads them)


@dataclass(frozen=True)
class ShadowEntry:
    """A task version in shadow: only its selector, which scores live traffic without answering any request."""

    name: str
    version: int
    bundle_id: str
    selector: Selector = field(repr=False)
    label_set: frozenset[str] = field(repr=False)  # its classes as `label_key`s: label-aware routing, as when active


@dataclass(frozen=True)
class BankSnapshot:
    """Never mutated: a change builds a new snapshot that shares tensors with this one."""

    backbone: Backbone
    experts: Mapping[str, tuple[tuple[Expert, ...], ...]]  # tower -> block -> slot
    expert_ids: Mapping[str, tuple[str, int, int]]  # id -> (tower, block, slot)
    tasks: tuple[TaskEntry, ...] = ()
    generation: int = 0
    config: MoEConfig = field(default_factory=MoEConfig)
    degraded: Mapping[str, str] = field(default_factory=dict)  # active tasks left out: task -> why
    bundle_ids: frozenset[str] = frozenset()  # the bundles it was built from: its tasks' and their experts' providers
    shadows: tuple[ShadowEntry, ...] = ()  # versions scoring live traffic beside the routing (sorted by task)
    shadow_degraded: Mapping[str, str] = field(default_factory=dict)  # versions in shadow left out: bundle id -> why

    def __repr__(self) -> str:  # not the experts' tensors
        tasks = ", ".join(f"{t.name} v{t.version}" for t in self.tasks)
        shadows = ", ".join(f"{t.name} v{t.version}" for t in self.shadows)
        experts = sum(len(slots) for blocks in self.experts.values() for slots in blocks)
        return (
            f"BankSnapshot(generation={self.generation}, tasks=[{tasks}], experts={experts}, shadows=[{shadows}], "
            f"degraded={sorted(self.degraded)})"
        )

    @cached_property
    def selector_stack(self) -> SelectorStack:
        """Its tasks' selectors, stacked to be scored at once (made on first use; a snapshot never changes)."""
        return SelectorStack([t.selector for t in self.tasks])

    @cached_property
    def label_sets(self) -> tuple[frozenset[str], ...]:
        """Each task's class names as `label_key`s, for label-aware routing (`inference.known_tasks`)."""
        return tuple(frozenset(label_key(c) for c in t.classes) for t in self.tasks)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def task_index(self, name: str) -> int:
        for i, t in enumerate(self.tasks):
            if t.name == name:
                return i
        if name in self.degraded:
            raise TaskDegraded(
                f"task {shown(name)} is active but cannot be served: {self.degraded[name]} (docs/security.md, "
                "Degraded start, says how to repair it)"
            )
        spelt = label_key(name).replace("-", " ") if isinstance(name, str) else None
        mode = {"auto": AUTO, "zero shot": ZERO_SHOT, "zeroshot": ZERO_SHOT}.get(spelt or "")
        hint = f" ({mode!r} is the mode of that name)" if mode else ""  # task="zero_shot" (an outside check)
        active = ", ".join(self.task_names) or "none"
        raise TaskNotFound(f"task {shown(name)} is not active{hint}; active tasks: {active}")

    @property
    def prefix_block(self) -> int:
        """The image tower's first block with experts when it is above 0 and a task is active: the frozen pass
        keeps the tokens entering it and a routed image's adapted pass starts there. 0: no shared prefix."""
        if not self.tasks or not self.config.expert_blocks:
            return 0
        return self.config.first_block(self.backbone.towers["visual"].layers)

    def routing(self, task_index: torch.Tensor, training: bool = False) -> Routing:
        """A per-call routing over this bank for the given per-sample task indices (-1: no adapter)."""
        return Routing(
            self.experts, [t.router for t in self.tasks], task_index.to(self.backbone.device), self.config, training
        )

    def expert_bytes(self) -> int:
        return sum(e.tensor_bytes() for blocks in self.experts.values() for slots in blocks for e in slots)

    def describe(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "tasks": list(self.task_names),
            "degraded": dict(self.degraded),
            "experts": len(self.expert_ids),
            "expert_bytes": self.expert_bytes(),
        }


def bank_config(previous: BankSnapshot | None, bundles: Iterable[Bundle]) -> MoEConfig:
    """The MoE settings a bank computes with: those of the bank it grows from while that serves any task, else
    those the first of `bundles` (by task name) was trained with, else the defaults. Every task must agree."""
    if previous is not None and previous.tasks:
        return previous.config
    ordered = sorted(bundles, key=lambda b: b.task)
    saved = [b.manifest.moe for b in ordered if b.manifest.moe is not None]
    if saved:
        return saved[0]
    base = previous.config if previous is not None else MoEConfig()
    if ordered:  # bundles made before `moe` was saved: their routing says how they compute
        routing = ordered[0].manifest.routing
        return replace(base, top_k=routing.top_k, scale=base.scale if routing.scale is None else routing.scale)
    return base


def empty_bank(backbone: Backbone, generation: int = 0, config: MoEConfig | None = None) -> BankSnapshot:
    experts = {t: tuple(() for _ in range(backbone.towers[t].layers)) for t in TOWERS}
    return BankSnapshot(backbone, experts, {}, (), generation, config or MoEConfig())


def _task_entry(
    bundle: Bundle, ids: Mapping[str, tuple[str, int, int]], device: torch.device, config: MoEConfig
) -> TaskEntry:
    check_config(bundle, config)
    routing = bundle.manifest.routing.blocks
    weights, slots = {}, {}
    for tower in TOWERS:
        weights[tower] = [w.to(device) for w in bundle.routers[tower]]
        slots[tower] = []
        for block, col_ids in enumerate(routing[tower]):
            missing = [e[:12] for e in col_ids if ids.get(e, (None, None))[:2] != (tower, block)]
            if missing:
                raise MissingExpert(
                    f"task {bundle.task!r} routes {tower}.{block} to experts not in the bank at that "
                    f"place: {', '.join(missing[:5])}"
                )
            slots[tower].append(torch.tensor([ids[e][2] for e in col_ids], dtype=torch.long, device=device))
    sel = selector_of(bundle, device)
    m = bundle.manifest
    return TaskEntry(
        m.task,
        m.version,
        bundle.id,
        m.classes,
        m.templates,
        TaskRouter(weights, slots),
        sel,
        m,
        bundle.file_bytes,
        bundle.probes,
    )


def selector_of(bundle: Bundle, device: torch.device) -> Selector:
    """A bundle's selector, its tensors on `device`."""
    sel = load_selector(asdict(bundle.manifest.selector), bundle.selector_tensors)
    for name in sel.tensors():
        setattr(sel, name, getattr(sel, name).to(device))
    return sel


def shadow_entry(bundle: Bundle, device: torch.device) -> ShadowEntry:
    """Its selector with tensors of their own: views would keep the bundle's whole memory block alive."""
    sel = selector_of(bundle, device)
    for name in sel.tensors():
        setattr(sel, name, getattr(sel, name).clone())
    labels = frozenset(label_key(c) for c in bundle.manifest.classes)
    return ShadowEntry(bundle.task, bundle.version, bundle.id, sel, labels)


def routed_places(
    tasks: Iterable[Bundle], known: Mapping[str, tuple[str, int]] | None = None
) -> dict[str, tuple[str, int]]:
    """{expert id: (tower, block)} where `tasks` route to it; MissingExpert if one of them routes an id somewhere
    else than another does, or than `known` (where the bank's other tasks route it) says."""
    places: dict[str, tuple[str, int]] = {}
    known = known or {}
    for b in tasks:
        for eid, place in b.manifest.routing.places().items():
            other = known.get(eid) or places.setdefault(eid, place)
            if other != place:
                raise MissingExpert(
                    f"task {b.task!r} routes expert {eid[:12]} at {place[0]}.{place[1]}, but another active task "
                    f"routes it at {other[0]}.{other[1]}: an expert sits in one place"
                )
            places[eid] = place
    return places


def build_bank(
    backbone: Backbone,
    tasks: Sequence[Bundle],
    providers: Iterable[Bundle] = (),
    generation: int = 0,
    previous: BankSnapshot | None = None,
    degraded: Mapping[str, str] | None = None,
) -> BankSnapshot:
    """Build a snapshot for the given active task bundles.

    Experts come from the task bundles themselves and from `providers` (older bundles whose experts they use).
    Slots of `previous` keep their order and tensors, so unchanged tasks compute exactly as before.
    `degraded` records active tasks the caller left out, and why.
    """
    providers = tuple(providers)
    available: dict[str, PlacedExpert] = {}
    for b in (*tasks, *providers):
        available.update(b.experts)
    prior = {t.bundle_id: t for t in previous.tasks} if previous is not None else {}
    config = bank_config(previous, tasks)
    fresh = [b for b in tasks if b.id not in prior]  # the others were checked when they entered `previous`
    if fresh:
        placed = {eid: (tw, bl) for eid, (tw, bl, _) in (previous.expert_ids.items() if previous else ())}
        placed.update({e: (p.tower, p.block) for e, p in available.items()})
        for b in fresh:
            check_compatible(b, backbone, placed, config)
    needed = {e for b in tasks for e in b.manifest.routing.expert_ids()}
    order: dict[tuple[str, int], list[str]] = {(t, i): [] for t in TOWERS for i in range(backbone.towers[t].layers)}
    tensors: dict[str, Expert] = {}
    if previous is not None:
        for eid, (tw, bl, s) in sorted(previous.expert_ids.items(), key=lambda kv: kv[1][2]):
            if eid in needed:
                tensors[eid] = previous.experts[tw][bl][s]
                order[(tw, bl)].append(eid)
    # Where each expert goes is where the tasks route to it: an id names tensors, and two stored bundles may carry
    # the same tensors at different places (one placed by a task no longer active); the tasks' routing decides.
    places = routed_places(tasks)
    for eid in sorted(needed - set(tensors)):
        if eid not in available:
            raise MissingExpert(f"expert {eid[:12]} is used by an active task but no stored bundle provides it")
        tensors[eid] = Expert.from_parts({k: t.to(backbone.device) for k, t in available[eid].expert.parts().items()})
        order[places[eid]].append(eid)
    ids = {eid: (tw, bl, s) for (tw, bl), eids in order.items() for s, eid in enumerate(eids)}
    experts = {
        t: tuple(tuple(tensors[e] for e in order[(t, i)]) for i in range(backbone.towers[t].layers)) for t in TOWERS
    }
    # When every expert of `previous` stays, every slot keeps its index: unchanged tasks keep their entries.
    same_slots = previous is not None and all(eid in needed for eid in previous.expert_ids)
    entries = tuple(
        prior[b.id] if same_slots and b.id in prior else _task_entry(b, ids, backbone.device, config)
        for b in sorted(tasks, key=lambda b: b.task)
    )
    used = frozenset(b.id for b in (*tasks, *providers))
    return BankSnapshot(backbone, experts, ids, entries, generation, config, dict(degraded or {}), used)

"""The interference gate: what a task version would do to traffic, measured on the bank it would give before it
goes live (docs/safety.md).

The candidate bank routes, exactly as the server routes (argmin of error / threshold, zero-shot above 1):
the new version's own probes (`self_claim`), every other active task's probes (`stolen`: the share that would
go to the new version) and the backbone's reference set of outside images (`zero_shot_captured`). A version
above the limits is refused unless forced.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .bank import BankSnapshot
from .errors import ClipbankError
from .inference import route_scores, task_scores
from .store_index import StoreIndex


@dataclass(frozen=True)
class GateLimits:
    max_stolen: float = 0.02  # of any other task's probes
    max_zero_shot_captured: float = 0.05  # of the reference set


def shares_versus(share: float, limit: float) -> tuple[str, str]:
    """ "A% ... (limit B%)" with the digits the two need: never a limit of 0.0001 shown as "0.0%", nor a share just
    above its limit shown equal to it."""
    digits = max(1 if x >= 0.01 or x == 0 else 2 if x >= 0.001 else 3 for x in (share, limit))
    while digits < 4 and f"{share:.{digits}%}" == f"{limit:.{digits}%}":
        digits += 1
    return f"{share:.{digits}%}", f"{limit:.{digits}%}"


@dataclass(frozen=True)
class GateReport:
    task: str
    version: int
    self_claim: float | None  # None: the bundle has no probes
    stolen: Mapping[str, float] = field(default_factory=dict)  # other task -> share of its probes taken
    zero_shot_captured: float | None = None  # None: no reference set for this backbone
    unmeasured: tuple[str, ...] = ()  # other active tasks without probes (bundles made before probes)
    limits: GateLimits = field(default_factory=GateLimits)
    # other task -> share of its probes the task's serving version takes already, and the new one keeps (not stolen)
    already_taken: Mapping[str, float] = field(default_factory=dict)
    own_routes: Mapping[str, float] = field(default_factory=dict)  # where its own probes go instead: task/zero-shot
    zero_shot_already: float | None = None  # of the reference set, what the serving version takes and it keeps

    def offences(self) -> list[str]:
        """Every figure above its limit, worst first, in words."""
        out = []
        for task, share in sorted(self.stolen.items(), key=lambda kv: -kv[1]):
            if share > self.limits.max_stolen:
                taken, limit = shares_versus(share, self.limits.max_stolen)
                out.append(f"it would take {taken} of the images of task {task!r} (limit {limit})")
        if self.zero_shot_captured is not None and self.zero_shot_captured > self.limits.max_zero_shot_captured:
            captured, limit = shares_versus(self.zero_shot_captured, self.limits.max_zero_shot_captured)
            out.append(f"it would claim {captured} of outside images that now go to zero-shot (limit {limit})")
        return out

    def without_licence(self) -> GateReport:
        """The report as a gate counts it when the task's serving version is no licence (forced past the gate,
        made active ungated, or only previewed): what that version takes already counts as taken."""
        both = {*self.stolen, *self.already_taken}
        stolen = {t: self.stolen.get(t, 0.0) + self.already_taken.get(t, 0.0) for t in both}
        captured = self.zero_shot_captured
        if captured is not None:
            captured += self.zero_shot_already or 0.0
        return replace(self, stolen=stolen, zero_shot_captured=captured, already_taken={}, zero_shot_already=None)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> GateReport:
        """The report `to_json` wrote (a training run's preview, say)."""
        return cls(
            obj["task"],
            obj["version"],
            obj.get("self_claim"),
            dict(obj.get("stolen") or {}),
            obj.get("zero_shot_captured"),
            tuple(obj.get("unmeasured") or ()),
            GateLimits(**(obj.get("limits") or {})),
            dict(obj.get("already_taken") or {}),
            dict(obj.get("own_routes") or {}),
            obj.get("zero_shot_already"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "version": self.version,
            "self_claim": self.self_claim,
            "stolen": dict(self.stolen),
            "zero_shot_captured": self.zero_shot_captured,
            "unmeasured": list(self.unmeasured),
            "limits": {
                "max_stolen": self.limits.max_stolen,
                "max_zero_shot_captured": self.limits.max_zero_shot_captured,
            },
            "already_taken": dict(self.already_taken),
            "zero_shot_already": self.zero_shot_already,
            "own_routes": dict(self.own_routes),
            "passed": not self.offences(),
            "offences": self.offences(),
        }


class InterferenceRefused(ClipbankError):
    """A version would take other tasks' or zero-shot traffic beyond the gate's limits (`force` overrides)."""

    code = "interference"

    def __init__(self, report: GateReport, upload: bool = False, failed_when_stored: bool = False) -> None:
        """`upload`: the version was being uploaded (so nothing was stored), not a stored one activated.
        `failed_when_stored`: the report kept beside the stored version failed too (its last check: stored inactive,
        in shadow, or forced active)."""
        offences = report.offences()
        if upload:
            why = (
                "Retrain it on this bank (`clipbank train --store` on a copy of the server's store folder: the "
                "other tasks' images are then its selector's negatives, and its summary previews this gate), with "
                "more steps or the reference set as negatives; or land it anyway with force=true on the upload or "
                "the activation (`clipbank push --force`)."
            )
        elif failed_when_stored:
            why = (
                "It failed the gate when it was last checked too (stored, put in shadow or forced active; its report: "
                "GET /tasks/NAME): retrain it (more steps, "
                "the reference set as negatives), or activate it anyway with force=true (`clipbank tasks activate "
                "--force`)."
            )
        else:
            why = (
                "It is checked against the bank as it is now, with the backbone's reference set: tasks activated "
                "since it was stored (one forced past the gate, or made active in the store folder, ungated: "
                "`clipbank store activate`, `clipbank train --store --force`), or its own selector, if an "
                "older release made it (before its selectors learned from the reference set), may be why. Deal with "
                "those, or activate it anyway with force=true (`clipbank tasks activate --force`; retraining makes a "
                "new version)."
            )
        verb = "stored" if upload else "activated"
        super().__init__(f"task {report.task!r} v{report.version} was not {verb}: " + "; ".join(offences) + ". " + why)
        self.report, self.details = report, report.to_json()


Scores = Callable[[torch.Tensor], torch.Tensor]  # frozen embeddings [n, D] -> selector scores [n, T]


Held = Callable[[torch.Tensor], torch.Tensor]  # embeddings [n, D] -> [n] bool: the task's serving version has them


def held_by(scores: Scores, index: int, device: torch.device) -> Held:
    """Which embeddings the bank of `scores` routes to its column `index`: the task as it serves now, whose
    images a new version of it does not take from anyone."""
    return lambda feats: route_scores(scores(feats.to(device, torch.float32)))[0] == index


def _claimed_by(
    scores: Scores, feats: torch.Tensor | None, index: int, device: torch.device, held: Held | None = None
) -> tuple[float, float] | None:
    """The shares of `feats` newly routed to task column `index`, and routed to it already (by the task's serving
    version: `held`); None: nothing to measure."""
    if feats is None:
        return None
    if feats.shape[0] == 0:
        return 0.0, 0.0
    taken = route_scores(scores(feats.to(device, torch.float32)))[0] == index
    kept = torch.zeros_like(taken)
    if held is not None and bool(taken.any()):  # only what it takes can be held: the serving bank routes those alone
        kept[taken] = held(feats[taken.to(feats.device)]).to(kept.device)
    return round(float((taken & ~kept).float().mean()), 4), round(float(kept.float().mean()), 4)


def _own(
    scores: Scores, own: torch.Tensor | None, index: int, names: list[str], device: torch.device
) -> tuple[float | None, dict[str, float]]:
    """The share of the version's own probes routed to it (None: it has none), and where the rest go: the share
    per other task (by column name) or zero-shot."""
    if own is None or own.shape[0] == 0:
        return (None if own is None else 0.0), {}
    routed = route_scores(scores(own.to(device, torch.float32)))[0]
    shares = {column: round(float((routed == column).float().mean()), 4) for column in set(routed.tolist())}
    elsewhere = {names[c] if c >= 0 else "zero-shot": share for c, share in sorted(shares.items()) if c != index}
    return shares.get(index, 0.0), elsewhere


def gate_report(
    task: str,
    version: int,
    scores: Scores,
    names: list[str],
    own: torch.Tensor | None,
    others: Mapping[str, torch.Tensor | None],
    reference: torch.Tensor | None,
    limits: GateLimits,
    device: torch.device,
    held: Held | None = None,
) -> GateReport:
    """The gate's report for the version of `task`, one of `names`, the columns of `scores` (the candidate bank's
    selectors): `own` its probes, `others` every other active task's probes (None: it has none). `held`: what
    the task's serving version routes to it; those images are not taken by a new version of it (a rollback)."""
    index = names.index(task)
    claims = {name: _claimed_by(scores, p, index, device, held) for name, p in others.items() if p is not None}
    stolen = {name: c[0] for name, c in claims.items() if c is not None}
    already = {name: c[1] for name, c in claims.items() if c is not None and c[1] > 0}
    unmeasured = tuple(name for name, p in others.items() if p is None)
    mine, own_routes = _own(scores, own, index, names, device)
    captured = _claimed_by(scores, reference, index, device, held)
    return GateReport(
        task,
        version,
        mine,
        stolen,
        captured[0] if captured is not None else None,
        unmeasured,
        limits,
        already,
        own_routes,
        captured[1] if captured is not None and held is not None else None,
    )


def interference(
    bank: BankSnapshot,
    task: str,
    reference: torch.Tensor | None,
    limits: GateLimits,
    serving: BankSnapshot | None = None,
) -> GateReport:
    """The gate's report for `task` as active in `bank` (the candidate bank), with `reference` [N, D]. `serving`:
    the bank serving now; images its version of `task` takes already are not counted as taken by the new one."""
    index = bank.task_index(task)
    others = {t.name: t.probes for t in bank.tasks if t.name != task}
    held = None
    if serving is not None and any(t.name == task for t in serving.tasks):
        held = held_by(functools.partial(task_scores, serving), serving.task_index(task), serving.backbone.device)
    return gate_report(
        task,
        bank.tasks[index].version,
        functools.partial(task_scores, bank),
        [t.name for t in bank.tasks],
        bank.tasks[index].probes,
        others,
        reference,
        limits,
        bank.backbone.device,
        held,
    )


def trusted_serving(bank: BankSnapshot, index: StoreIndex, task: str) -> BankSnapshot | None:
    """`bank` as the gate's `serving` bank (what the task's version takes already is not taken anew), when it may
    speak for the task: built from the store as it is (another server's change since would make it stale), and the
    task's active version passed its last check unforced. A version forced past the gate is no licence for the next
    one to take the same images unforced (a review); a version with no report, or a training run's preview of one
    (trained into a store: its bank may have changed since, a server's limits may be others), is none."""
    record = index.tasks.get(task)
    active = record.active_record() if record is not None else None
    report = active.gate if active is not None else None
    if bank.generation != index.generation or not (isinstance(report, Mapping) and report.get("passed") is True):
        return None
    return None if report.get("preview") else bank  # a training run's preview is no server's check


@dataclass(frozen=True)
class Gate:
    """The gate a registry applies to every activation: its limits and the backbone's reference set."""

    limits: GateLimits = field(default_factory=GateLimits)
    reference: torch.Tensor | None = None  # [N, D] outside images' frozen embeddings; None: not measured

    def report(self, bank: BankSnapshot, task: str, serving: BankSnapshot | None = None) -> GateReport:
        return interference(bank, task, self.reference, self.limits, serving)

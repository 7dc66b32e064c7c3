"""The interference gate: what a task version would do to traffic, measured on the bank it would give before it
goes live (docs/safety.md).

The candidate bank routes, exactly as the server routes (argmin of error / threshold, zero-shot above 1):
the new version's own probes (`self_claim`), every other active task's probes (`stolen`: the share that would
go to the new version) and the backbone's reference set of outside images (`zero_shot_captured`). A version
above the limits is refused unless forced.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .bank import BankSnapshot
from .errors import ClipbankError
from .inference import route_scores, task_scores


@dataclass(frozen=True)
class GateLimits:
    max_stolen: float = 0.02  # of any other task's probes
    max_zero_shot_captured: float = 0.05  # of the reference set


@dataclass(frozen=True)
class GateReport:
    task: str
    version: int
    self_claim: float | None  # None: the bundle has no probes
    stolen: Mapping[str, float] = field(default_factory=dict)  # other task -> share of its probes taken
    zero_shot_captured: float | None = None  # None: no reference set for this backbone
    unmeasured: tuple[str, ...] = ()  # other active tasks without probes (bundles made before probes)
    limits: GateLimits = field(default_factory=GateLimits)

    def offences(self) -> list[str]:
        """Every figure above its limit, worst first, in words."""
        out = [
            f"it would take {share:.1%} of the images of task {task!r} (limit {self.limits.max_stolen:.1%})"
            for task, share in sorted(self.stolen.items(), key=lambda kv: -kv[1])
            if share > self.limits.max_stolen
        ]
        if self.zero_shot_captured is not None and self.zero_shot_captured > self.limits.max_zero_shot_captured:
            out.append(
                f"it would claim {self.zero_shot_captured:.1%} of outside images that now go to zero-shot "
                f"(limit {self.limits.max_zero_shot_captured:.1%})"
            )
        return out

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
            "passed": not self.offences(),
        }


class InterferenceRefused(ClipbankError):
    """A version would take other tasks' or zero-shot traffic beyond the gate's limits (`force` overrides)."""

    code = "interference"

    def __init__(self, report: GateReport) -> None:
        offences = report.offences()
        super().__init__(
            f"task {report.task!r} v{report.version} was not activated: "
            + "; ".join(offences)
            + ". Retrain it (more steps, the reference set as negatives), or land it anyway with force=true on the "
            "upload or the activation (`clipbank push --force`)."
        )
        self.details = report.to_json()


def _claimed_by(bank: BankSnapshot, feats: torch.Tensor, index: int) -> float:
    """The share of `feats` the bank routes to task `index`."""
    if feats.shape[0] == 0:
        return 0.0
    routed, _ = route_scores(task_scores(bank, feats.to(bank.backbone.device, torch.float32)))
    return float((routed == index).float().mean())


def interference(bank: BankSnapshot, task: str, reference: torch.Tensor | None, limits: GateLimits) -> GateReport:
    """The gate's report for `task` as active in `bank` (the candidate bank), with `reference` [N, D]."""
    index = bank.task_index(task)
    entry = bank.tasks[index]
    stolen, unmeasured = {}, []
    for other in bank.tasks:
        if other.name == task:
            continue
        if other.probes is None:
            unmeasured.append(other.name)
        else:
            stolen[other.name] = round(_claimed_by(bank, other.probes, index), 4)
    own = None if entry.probes is None else round(_claimed_by(bank, entry.probes, index), 4)
    captured = None if reference is None else round(_claimed_by(bank, reference, index), 4)
    return GateReport(task, entry.version, own, stolen, captured, tuple(unmeasured), limits)


@dataclass(frozen=True)
class Gate:
    """The gate a registry applies to every activation: its limits and the backbone's reference set."""

    limits: GateLimits = field(default_factory=GateLimits)
    reference: torch.Tensor | None = None  # [N, D] outside images' frozen embeddings; None: not measured

    def report(self, bank: BankSnapshot, task: str) -> GateReport:
        return interference(bank, task, self.reference, self.limits)

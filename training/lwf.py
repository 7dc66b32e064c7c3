"""Learning without Forgetting (Li & Hoiem, 2017) for a task's new version: its training images are the new
classes' only, so the parent version's answers over the old classes, on those same images, are kept as soft
targets. The parent's experts and router are frozen in the bank; this costs one no-grad adapted pass per step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from model_store.bank import BankSnapshot
from model_store.moe_clip import encode_image, encode_text

TEMPERATURE = 2.0  # LwF's


class ParentTeacher:
    """The active version of `task` in `bank` as a teacher over its own classes, for a new version whose classes
    are `classes` (the parent's first, as `clipbank train` orders them)."""

    def __init__(self, bank: BankSnapshot, task: str, classes: Sequence[str], weight: float) -> None:
        self.bank, self.weight = bank, weight
        self.index = bank.task_index(task)
        parent = bank.tasks[self.index]
        missing = [c for c in parent.classes if c not in classes]
        if missing:
            raise ValueError(f"the new version of {task} lacks the parent's classes {missing}")
        self.columns = torch.tensor([list(classes).index(c) for c in parent.classes], device=bank.backbone.device)
        bb = bank.backbone
        tokens = bb.tokenizer([parent.templates[0].format(c) for c in parent.classes]).to(bb.device)
        with torch.no_grad():
            self.text = encode_text(bb.model, tokens, self._routing(len(tokens)))

    def _routing(self, n: int) -> Any:
        return self.bank.routing(torch.full((n,), self.index, dtype=torch.long))

    def loss(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The distillation term for a batch `x` whose new-version logits (over every class) are `logits`."""
        model = self.bank.backbone.model
        with torch.no_grad():
            target = model.logit_scale.exp() * encode_image(model, x, self._routing(len(x))) @ self.text.T
        student = logits.index_select(1, self.columns)
        kl = F.kl_div(
            F.log_softmax(student / TEMPERATURE, 1),
            F.log_softmax(target / TEMPERATURE, 1),
            reduction="batchmean",
            log_target=True,
        )
        return self.weight * TEMPERATURE**2 * kl


def parent_teacher(bank: BankSnapshot, task: str, classes: Sequence[str], weight: float) -> ParentTeacher | None:
    """A teacher when `task` has an active version in `bank` with classes to keep, and `weight` > 0."""
    if weight <= 0 or task not in bank.task_names:
        return None
    return ParentTeacher(bank, task, classes, weight)

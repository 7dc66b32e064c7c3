"""What training says of a trained task on its validation images: accuracy over them, per class and balanced
(each class counting the same), with a warning when the one hides the other, and which experts its routers use;
and a warning when the validation folder is mostly a copy of the training one."""

from __future__ import annotations

import filecmp
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model_store.bank import BankSnapshot
from model_store.experts import ActivationCounts

from .data import FolderListing, LabelledImages, some
from .scoring import correct_per_class

log = logging.getLogger(__name__)
COUNT_SAMPLE = 2048  # training images whose expert choices are counted for the report
BALANCE_GAP = 0.10  # balanced accuracy this far under the plain one: the largest classes hide the others


def evaluate(
    bank: BankSnapshot,
    params: Any,
    data: LabelledImages,
    templates: Sequence[str],
    counts: ActivationCounts | None = None,
) -> tuple[list[int], list[int]]:
    """Per class of `data.classes`, (right, images); with `params` (the trainer's task parameters), the adapted
    model (no noise), else zero-shot CLIP."""
    routing_for = (lambda n: None) if params is None else (lambda n: params.routing(bank, n, False, counts=counts))
    return correct_per_class(bank.backbone.model, bank.backbone, data, templates, routing_for)


def share(counts: tuple[list[int], list[int]]) -> float:
    right, seen = counts
    return sum(right) / max(1, sum(seen))


def validated(
    bank: BankSnapshot, params: Any, fit: LabelledImages, val: LabelledImages, cfg: Any, zero_shot: float | None
) -> tuple[dict, dict]:
    """(which experts the task's routers use, per block, counted on a sample of the training images: a full
    adapted pass over a large training set is not worth it; the validation figures for the report, with what to
    try when they are low against zero-shot CLIP's `zero_shot`)."""
    counts = ActivationCounts()
    sample = torch.randperm(len(fit), generator=torch.Generator().manual_seed(cfg.seed))[:COUNT_SAMPLE].tolist()
    evaluate(bank, params, fit.subset(sorted(sample)), cfg.serving_templates, counts)
    activations = {f"{t}.{b}": c.tolist() for (t, b), c in sorted(counts.counts.items())}
    figures = validation_figures(val.classes, *evaluate(bank, params, val, cfg.serving_templates))
    figures["val_warnings"] += learning_warnings(  # per class trained on (an outside check's "about 20" was 60)
        zero_shot, figures["val_accuracy"], cfg.steps, len(fit), len(set(fit.labels))
    )
    for warning in figures["val_warnings"]:
        log.warning("task %s: %s", cfg.task, warning)
    return activations, figures


def validation_figures(classes: Sequence[str], right: list[int], seen: list[int]) -> dict[str, Any]:
    """`val_accuracy`, `val_accuracy_per_class` (null for a class with no validation image), `val_balanced_accuracy`
    (their mean), and `val_warnings`. An outside check's task of digits with 120, 60, 30, 8 and 1 images per class
    reported 86% on its (as unbalanced) validation split and answered 44% of a balanced held-out set: two classes
    never."""
    per_class = {c: (r / n if n else None) for c, r, n in zip(classes, right, seen, strict=True)}
    scored = [a for a in per_class.values() if a is not None]
    overall = sum(right) / max(1, sum(seen))
    balanced = sum(scored) / max(1, len(scored))
    warnings = []
    if balanced < overall - BALANCE_GAP:
        worst = sorted((a, c) for c, a in per_class.items() if a is not None)[:5]
        warnings.append(
            f"validation accuracy {overall:.1%} is mostly that of the largest classes: {balanced:.1%} with each class "
            f"counting the same (lowest: {', '.join(f'{c} {a:.0%}' for a, c in worst)}); add images of the small ones"
        )
    unseen = [c for c, n in zip(classes, seen, strict=True) if not n]
    if unseen:
        warnings.append(f"class(es) {some(unseen)} have no validation image: nothing says how well they are learned")
    return {
        "val_accuracy": overall,
        "val_accuracy_per_class": per_class,
        "val_balanced_accuracy": balanced,
        "val_warnings": warnings,
    }


LEARNED_LITTLE = 0.05  # validation accuracy within this of zero-shot CLIP's: the task learned little
LOW_ACCURACY = 0.7
WELL_LEARNED = 0.95  # at or above: no advice, however close zero-shot CLIP was


def learning_warnings(zero_shot: float | None, val: float | None, steps: int, images: int, classes: int) -> list[str]:
    """What to try when validation accuracy is low: an outside check's runs ended at zero-shot's accuracy, or at
    57%, and nothing said so or what to do (the figures were in the JSON alone)."""
    if val is None or val >= WELL_LEARNED:
        return []
    knobs = f"more --steps (now {steps}) or more training images (now about {images // max(1, classes)} per class)"
    if zero_shot is not None and val < zero_shot:
        return [
            f"validation accuracy {val:.1%} is below zero-shot CLIP's {zero_shot:.1%}: the experts made it worse. "
            f"Check the labels and that the validation images are of the kind the training ones are; try {knobs}"
        ]
    if zero_shot is not None and val < zero_shot + LEARNED_LITTLE:
        return [
            f"validation accuracy {val:.1%} is hardly above zero-shot CLIP's {zero_shot:.1%}: the task learned "
            f"little. Try {knobs}, and check that the validation images are of the kind the training ones are"
        ]
    if val < LOW_ACCURACY:
        return [f"validation accuracy {val:.1%} is low: {knobs} may help; `clipbank eval` shows the weakest classes"]
    return []


def warn_if_val_copies_data(train: FolderListing, val: FolderListing) -> None:
    """A validation folder whose images are mostly the training folder's (the same class, file name and bytes: a
    copy made with `cp -r`) overstates the task as --val naming --data's folder does (an outside check's copy
    calibrated its selector on training images, and nothing was said)."""

    def files(listing: FolderListing) -> dict[tuple[str, str, int], Path]:
        return {(p.parent.name, p.name, p.stat().st_size): p for p in listing.paths}

    ours, theirs = files(train), files(val)  # then the same bytes: an export names every split's files alike
    shared = sum(filecmp.cmp(ours[k], theirs[k], shallow=False) for k in ours.keys() & theirs.keys())
    if shared > len(val.paths) / 2:
        log.warning(
            "%d of the %d --val images are also in --data (the same class, file name and bytes): validation accuracy "
            "and the selector's threshold are then measured on training images, and overstate what the task will do",
            shared,
            len(val.paths),
        )

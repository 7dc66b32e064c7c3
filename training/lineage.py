"""A new version of a task and its parent's classes: it answers over them, followed by its data's new ones."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from model_store.bank import BankSnapshot
from model_store.labels import label_key
from model_store.manifest import MAX_VERSION

from .data import LabelledImages

log = logging.getLogger(__name__)


def with_parent_classes(
    bank: BankSnapshot,
    task: str,
    train: LabelledImages,
    val: LabelledImages | None,
    version: int,
    parent: str | None,
    given: Sequence[str] | None,
) -> tuple[LabelledImages, LabelledImages | None, list[str]]:
    """`train` and `val` over the classes a new version keeps (`parent_classes_of`) and their warnings: as they
    are for a task's first version. A Python caller's new version dropped its parent's classes (the CLI's did not)."""
    _check_arguments(bank, train, val, version, parent)
    seen = parent_classes_of(bank, task, version, parent, given)
    if seen:
        return over_parent_classes(seen, train, val, version)
    if parent is None and task in bank.task_names:  # a version > 1 named no parent: say what it will answer over
        entry = bank.tasks[bank.task_index(task)]
        warning = (
            f"version {version} of task {task!r} names no parent, so it answers over its data's classes only, not "
            f"over those of the served version (bundle {entry.bundle_id[:12]}): give parent= to keep them"
        )
        log.warning("%s", warning)
        return train, val, [warning]
    return train, val, []


def _check_arguments(bank: Any, train: Any, val: Any, version: Any, parent: Any) -> None:
    """`train_task`'s arguments, by name, before any step runs (an outside check: the backbone given for the bank, a
    list for `val`, failed with AttributeErrors deep inside; `version=0` once the whole run had trained)."""
    if not isinstance(bank, BankSnapshot):
        raise TypeError(
            f"train_task's bank is a BankSnapshot, got {type(bank).__name__}: empty_bank(backbone) for a first task, "
            "BankLoader(store, backbone).load() to train on top of a store's tasks"
        )
    for name, data in (("train", train), ("val", val)):
        if not isinstance(data, LabelledImages) and not (name == "val" and data is None):
            raise TypeError(
                f"train_task's {name} is a LabelledImages (load_image_folder(path)), got {type(data).__name__}"
            )
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"version is an integer (1..{MAX_VERSION}), got {type(version).__name__} {version!r:.40}")
    if not 1 <= version <= MAX_VERSION:
        raise ValueError(f"version must be in 1..{MAX_VERSION}, got {version}")
    if parent is not None and not isinstance(parent, str):
        raise TypeError(f"parent is a bundle id (a string) or None, got {type(parent).__name__}")


def parent_classes_of(
    bank: BankSnapshot, task: str, version: int, parent: str | None, given: Sequence[str] | None
) -> tuple[str, ...]:
    """The classes a new version of `task` keeps: `given`, else those of `parent`'s bundle in `bank`. A version 1
    of a task the bank already serves is refused before any training (its store would refuse it after)."""
    if given is not None:
        return tuple(given)
    if parent is None:
        if version == 1 and task in bank.task_names:
            entry = bank.tasks[bank.task_index(task)]
            raise ValueError(
                f"the bank already serves task {task!r} (bundle {entry.bundle_id[:12]}), so its store would refuse a "
                "version 1: a new version of it needs version=<the store's newest + 1> and parent=<that bundle's "
                "id>, as `clipbank train --store` finds them; or give the task another name"
            )
        return ()
    for entry in bank.tasks:
        if entry.bundle_id == parent and entry.name == task:
            return tuple(entry.classes)
    raise ValueError(
        f"parent {parent[:12]!r} is not task {task!r}'s bundle in the bank: load the bank from the store that holds "
        "it (BankLoader(store, backbone).load()), or give its classes as parent_classes"
    )


def over_parent_classes(
    seen: Sequence[str], train: LabelledImages, val: LabelledImages | None, version: int
) -> tuple[LabelledImages, LabelledImages | None, list[str]]:
    """The data relabelled over the parent's classes followed by the new ones, and a warning when the training
    set lacks some of the parent's classes (measured: docs/method.md, Versions and classes)."""
    keys = {label_key(c): c for c in seen}
    for c in train.classes:  # 'Cloud' beside the parent's 'cloud': "make them differ" would add a second class
        if c not in seen and label_key(c) in keys:
            raise ValueError(
                f"class {c!r} of the data is the parent's class {keys[label_key(c)]!r} written otherwise (labels "
                f"match classes whatever their case, spacing or `_`): name its folder {keys[label_key(c)]!r}, so "
                "that its images train that class"
            )
    classes = tuple(seen) + tuple(c for c in train.classes if c not in seen)
    absent = [c for c in seen if c not in train.classes]
    warnings = []
    if absent:
        warnings.append(
            f"the training set has no images of {len(absent)} of the parent's classes ({', '.join(absent[:5])}"
            f"{', ...' if len(absent) > 5 else ''}): version {version} answers over them but learns nothing "
            "of them, and will mostly forget them; include their images to keep them"
        )
        log.warning("%s", warnings[-1])
    return train.with_classes(classes), val.with_classes(classes) if val is not None else None, warnings

"""The class-incremental offline protocol: one domain learned as 3 versions of one task, each adding classes,
trained as `clipbank train` trains a new version (only the new classes' images; it answers over every class seen
so far, its router may use the parent's experts). Forgetting is not zero by construction here: the new version
replaces its parent, and the old classes' images are not in its training set."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from model_store.backbone import Backbone
from model_store.bank import build_bank, empty_bank
from model_store.bundle import read_bundle
from model_store.inference import AUTO, TextCache
from model_store.reference import find_reference
from model_store.selector import SelectorConfig

from .cl_common import CLConfig
from .data import LabelledImages, load_domain
from .evaluate import accuracy_and_routes
from .progress import progress_bar
from .trainer import TrainConfig, train_task

CIL_DOMAIN = "digits"
CIL_VERSIONS = 3


def class_groups(classes: Sequence[str], versions: int) -> list[tuple[str, ...]]:
    """`classes` in order, cut into `versions` groups as even as can be (the first ones larger)."""
    if not 2 <= versions <= len(classes) // 2:
        raise ValueError(f"{len(classes)} classes cannot make {versions} versions of at least 2 classes each")
    return [tuple(str(c) for c in g) for g in np.array_split(np.array(classes, dtype=object), versions)]


def _only(data: LabelledImages, classes: Sequence[str]) -> LabelledImages:
    """The images of `classes`, labelled into `classes`."""
    keep = [i for i, y in enumerate(data.labels) if data.classes[y] in classes]
    sub = data.subset(keep)
    return LabelledImages(sub.images, [tuple(classes).index(sub.classes[y]) for y in sub.labels], tuple(classes))


def _accuracies(bank, test: LabelledImages, seen: tuple[str, ...], groups, task: str) -> dict[str, Any]:
    """Over the classes seen so far: accuracy per class group (pinned to the task and auto-routed)."""
    cache = TextCache()
    out: dict[str, Any] = {"pinned": [], "auto": []}
    for g in groups:
        data = _only(test, g).with_classes(seen)
        out["pinned"].append(accuracy_and_routes(bank, data, task, cache)[0])
        out["auto"].append(accuracy_and_routes(bank, data, AUTO, cache)[0])
    return out


def run_class_incremental(
    backbone: Backbone,
    cfg: CLConfig,
    domain: str = CIL_DOMAIN,
    versions: int = CIL_VERSIONS,
    train_limit: int | None = None,
    test_limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `domain` as `versions` versions of one task; after each, accuracy on every class group seen so far.
    `old_class_accuracy` is the mean over the images of the classes of earlier versions, pinned to the task."""
    train, val, test = (load_domain(domain, s) for s in ("train", "val", "test"))
    if train_limit:
        train = train.subset(range(min(train_limit, len(train))))
    if test_limit:
        val, test = (d.subset(range(min(test_limit, len(d)))) for d in (val, test))
    groups = class_groups(train.classes, versions)
    bank, bundles, seen = empty_bank(backbone), [], ()
    reference = find_reference(backbone)
    rows, start = [], time.perf_counter()
    for v, group in enumerate(
        progress_bar(groups, desc=f"class-incremental {domain}", unit="version", disable=not progress)
    ):
        seen = (*seen, *group)
        seed = cfg.seed + v
        selector = SelectorConfig(seed=seed)
        tcfg = TrainConfig(domain, cfg.steps, cfg.batch_size, seed=seed, selector=selector, distill=cfg.distill)
        parent = bundles[-1].id if bundles else None
        new_train, new_val = _only(train, group).with_classes(seen), _only(val, seen)
        result = train_task(bank, new_train, tcfg, new_val, v + 1, parent, progress=progress, reference=reference)
        bundles.append(read_bundle(result.bundle))
        bank = build_bank(backbone, bundles[-1:], providers=bundles[:-1], previous=bank)
        acc = _accuracies(bank, test, seen, groups[: v + 1], domain)
        counts = [sum(1 for y in test.labels if test.classes[y] in g) for g in groups[: v + 1]]
        val_acc = result.report["val_accuracy"]  # over every class seen so far: what defaults are chosen on
        rows.append(
            {"version": v + 1, "classes": list(seen), "val_accuracy": val_acc, "test_images_per_group": counts, **acc}
        )
    return _cil_report(domain, groups, rows, time.perf_counter() - start)


def _weighted(values: Sequence[float], weights: Sequence[int]) -> float:
    return float(np.average(values, weights=weights)) if sum(weights) else float("nan")


def _cil_report(domain: str, groups, rows: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    for r in rows:
        n = r["test_images_per_group"]
        for mode in ("pinned", "auto"):
            r[f"old_class_accuracy_{mode}"] = _weighted(r[mode][:-1], n[:-1]) if len(n) > 1 else None
            r[f"all_class_accuracy_{mode}"] = _weighted(r[mode], n)
    # forgetting: per class group, its accuracy right after its own version minus after the last, the largest
    last = rows[-1]["pinned"]
    forgetting = max(rows[g]["pinned"][g] - last[g] for g in range(len(groups) - 1))
    return {
        "domain": domain,
        "groups": [list(g) for g in groups],
        "versions": rows,
        "old_class_accuracy_last": round(100 * rows[-1]["old_class_accuracy_pinned"], 2),
        "old_class_accuracy_last_auto": round(100 * rows[-1]["old_class_accuracy_auto"], 2),
        "forgetting": round(100 * forgetting, 2),
        "seconds": round(seconds, 1),
    }

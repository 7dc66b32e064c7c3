"""The real protocols on user-provided data: MTIL (order I and II) and CIFAR-100 class-incremental.

Data comes from folders, `ROOT/<dataset>/{train,test}/<class>/*`, or from torchvision's dataset classes with
`download=False` (nothing is fetched). Images are read lazily, so a full MTIL run need not fit in memory.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model_store.backbone import Backbone
from model_store.bank import build_bank, empty_bank
from model_store.bundle import read_bundle
from model_store.inference import AUTO, TextCache
from model_store.reference import find_reference

from .cl_common import TEMPLATE
from .config import PROMPTS
from .continual import CLConfig, SequenceStep, run_continual
from .data import LabelledImages, LazyImages, load_image_folder
from .evaluate import accuracy_and_routes
from .progress import progress_bar
from .prompts import CIFAR_TEMPLATE, paper_classes, paper_templates, source
from .trainer import TrainConfig, train_task

MTIL_ORDER_I = (
    "aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist", "pets", "cars", "sun397",
)  # fmt: skip
MTIL_ORDER_II = (
    "cars", "food", "mnist", "pets", "flowers", "sun397", "aircraft", "caltech101", "dtd", "eurosat", "cifar100",
)  # fmt: skip
PROTOCOLS = {"mtil-1": MTIL_ORDER_I, "mtil-2": MTIL_ORDER_II}
CIFAR_STEPS = {"cifar100-10": 10, "cifar100-20": 20, "cifar100-50": 50}
# CIFAR-100's class order in MoE-Adapters4CL's class-incremental code (`cil/class_orders/cifar100.yaml`, the order
# ZSCL and earlier CIL work use); not numpy's RandomState(1993).permutation, which this module used before.
CIFAR100_CLASS_ORDER = (
    87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86, 84, 96, 18, 24, 32, 45, 88, 11, 4,
    67, 69, 66, 77, 47, 79, 93, 29, 50, 57, 83, 17, 81, 41, 12, 37, 59, 25, 20, 80, 73, 1, 28, 6, 46, 62, 82, 53, 9,
    31, 75, 38, 63, 33, 74, 27, 22, 36, 3, 16, 21, 60, 19, 70, 90, 89, 43, 5, 42, 65, 76, 40, 30, 23, 85, 2, 95, 56,
    48, 71, 64, 98, 13, 99, 7, 34, 55, 54, 26, 35, 39,
)  # fmt: skip
# The same code's CIFAR-100 settings for MoE-Adapters (`cil/configs/class/cifar100_*-MoE-Adapters.yaml`): batch 128,
# lr 1e-3, no label smoothing. Its prompt, "a bad photo of a {}.", is used with --prompts papers (prompts.py).
CIFAR_TRAIN = {"batch_size": 128, "lr": 1e-3, "label_smoothing": 0.0}

# torchvision class, and how to ask it for train and test (datasets with no split get a fixed 80/20 one)
TORCHVISION = {
    "aircraft": ("FGVCAircraft", {"split": "trainval"}, {"split": "test"}),
    "caltech101": ("Caltech101", None, None),
    "cifar100": ("CIFAR100", {"train": True}, {"train": False}),
    "dtd": ("DTD", {"split": "train"}, {"split": "test"}),
    "eurosat": ("EuroSAT", None, None),
    "flowers": ("Flowers102", {"split": "train"}, {"split": "test"}),
    "food": ("Food101", {"split": "train"}, {"split": "test"}),
    "mnist": ("MNIST", {"train": True}, {"train": False}),
    "pets": ("OxfordIIITPet", {"split": "trainval"}, {"split": "test"}),
    "cars": ("StanfordCars", {"split": "train"}, {"split": "test"}),
    "sun397": ("SUN397", None, None),
}


def _from_folder(root: Path, name: str) -> tuple[LabelledImages, LabelledImages]:
    train = load_image_folder(root / name / "train", lazy=True)
    return train, load_image_folder(root / name / "test", train.classes, lazy=True)


def _torchvision(root: Path, name: str, papers: bool) -> tuple[LabelledImages, LabelledImages]:
    import torchvision.datasets as tvd

    cls_name, train_kw, test_kw = TORCHVISION[name]
    cls = getattr(tvd, cls_name)

    def wrap(ds: Any, idx: Sequence[int]) -> LabelledImages:
        classes = getattr(ds, "classes", None) or getattr(ds, "categories", None)
        if classes is None:
            raise ValueError(f"torchvision {cls_name} has no class names; use the folder layout for {name}")
        labels = _labels_of(ds, idx)
        images = LazyImages(list(idx), lambda i: ds[i][0].convert("RGB"))
        names = tuple(str(c).replace("_", " ") for c in classes)
        return LabelledImages(images, labels, paper_classes(name, names) if papers else names)

    try:
        if train_kw is None:  # one pool: a fixed 80/20 split by index
            ds = cls(str(root), download=False)
            files = getattr(ds, "_image_files", None) or [p for p, _ in getattr(ds, "samples", [])] or None
            key = (lambda i: str(files[i])) if files else str  # a file path where known: order-independent
            test_idx = [i for i in range(len(ds)) if zlib.crc32(f"{name}/{key(i)}".encode()) % 5 == 0]
            held = set(test_idx)
            return wrap(ds, [i for i in range(len(ds)) if i not in held]), wrap(ds, test_idx)
        train, test = cls(str(root), download=False, **train_kw), cls(str(root), download=False, **test_kw)
    except (RuntimeError, OSError) as e:  # missing data; Caltech101 also tries to create folders
        raise FileNotFoundError(
            f"{name}: neither {root / name}/train and /test folders nor torchvision {cls_name} data under {root} "
            f"({e}); nothing is downloaded"
        ) from None
    return wrap(train, range(len(train))), wrap(test, range(len(test)))


def _labels_of(ds: Any, idx: Sequence[int]) -> list[int]:
    """Labels without decoding images, from whichever attribute this torchvision class keeps them in."""
    for attr in ("targets", "_labels", "y"):
        if hasattr(ds, attr):
            return [int(getattr(ds, attr)[i]) for i in idx]
    if hasattr(ds, "_samples"):
        return [int(ds._samples[i][1]) for i in idx]
    return [int(ds[i][1]) for i in idx]  # slow: reads every image once


def load_dataset(
    root: str | Path, name: str, limit: int | None = None, prompts: str = "plain"
) -> tuple[LabelledImages, LabelledImages]:
    """(train, test) of one dataset; `limit` keeps at most that many images per class (dry runs). With
    `prompts="papers"`, torchvision's class names become the papers' cleaned ones; folder names stay as they are."""
    if limit is not None and limit < 2:
        raise ValueError(f"--limit must be >= 2 (one image per class for training, one for validation), got {limit}")
    root = Path(root)
    if prompts not in PROMPTS:
        raise ValueError(f"prompts must be one of {', '.join(PROMPTS)}, got {prompts!r}")
    folder = (root / name / "train").is_dir()
    train, test = _from_folder(root, name) if folder else _torchvision(root, name, prompts == "papers")
    return train.per_class(limit), test.per_class(limit)


def few_shot(train: LabelledImages, shots: int, seed: int = 0) -> tuple[LabelledImages, LabelledImages]:
    """Few-shot MTIL's training set: `shots` images per class (a seeded sample); and, to validate on (the
    selector's calibration, validation accuracy), up to as many *other* images per class of the same train split.
    The test split stays whole."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(train.labels)
    fit: list[int] = []
    val: list[int] = []
    for c in range(len(train.classes)):
        idx = rng.permutation(np.flatnonzero(labels == c)).tolist()
        fit += idx[:shots]
        val += idx[shots : 2 * shots]
    if not val:
        raise ValueError(f"no train image is left to validate on beside {shots} shots per class")
    return train.subset(sorted(fit)), train.subset(sorted(val))


def mtil_sequence(
    root: str | Path,
    protocol: str,
    limit: int | None = None,
    val_fraction: float = 0.1,
    shots: int | None = None,
    prompts: str = "papers",
) -> list[SequenceStep]:
    """The 11 MTIL datasets in the protocol's order; validation is held out of each train split. With `shots`,
    few-shot MTIL: that many training images per class (`few_shot`). `prompts="papers"`: each dataset's prompt
    ensemble and cleaned class names (prompts.py); "plain": one template and torchvision's names."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join([*PROTOCOLS, *CIFAR_STEPS])}")
    seq = []
    for name in progress_bar(PROTOCOLS[protocol], desc="index datasets", unit="dataset"):
        train, test = load_dataset(root, name, limit, prompts)
        fit, val = train.holdout(val_fraction) if shots is None else few_shot(train, shots)
        seq.append(SequenceStep(name, fit, val, test, paper_templates(name) if prompts == "papers" else (TEMPLATE,)))
    return seq


def run_mtil(
    backbone: Backbone, seq: list[SequenceStep], protocol: str, cfg: CLConfig, shots: int | None, prompts: str
) -> dict:
    """MTIL on `seq` (`mtil_sequence`: indexed before the backbone is loaded, so missing data is said first)."""
    where = f"papers ({source()})" if prompts == "papers" else prompts
    return {"protocol": protocol, "shots": shots, "prompts": where, **run_continual(backbone, seq, cfg)}


# ----------------------------------------------------------------------------------------------- CIFAR-100


def class_order(n: int) -> list[int]:
    """CIFAR-100's order of the papers for n = 100; for another class count, a fixed seeded permutation."""
    if n == len(CIFAR100_CLASS_ORDER):
        return list(CIFAR100_CLASS_ORDER)
    return np.random.RandomState(1993).permutation(n).tolist()


def run_cifar_incremental(
    backbone: Backbone,
    data: tuple[LabelledImages, LabelledImages],
    protocol: str,
    cfg: CLConfig,
    prompts: str = "papers",
) -> dict[str, Any]:
    """CIFAR-100 in N steps: version k of task `cifar100` learns the k-th group of classes on top of version
    k-1 and answers over every class seen so far; it is evaluated on the test images of all of them. `data` is
    `load_dataset(root, "cifar100", limit)`'s (train, test): clip_benchmark cleans no CIFAR-100 names. With
    `prompts="papers"`, the papers' prompt trains and scores (CIFAR_TEMPLATE)."""
    if protocol not in CIFAR_STEPS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(CIFAR_STEPS)}")
    train, test = data
    template = CIFAR_TEMPLATE if prompts == "papers" else TEMPLATE
    order = class_order(len(train.classes))
    groups = np.array_split(np.array(order), CIFAR_STEPS[protocol])
    bank, parent, seen, rows = empty_bank(backbone), None, [], []
    start = time.perf_counter()
    for k, group in enumerate(progress_bar(groups, desc=protocol, unit="step")):
        seen += [int(c) for c in group]
        classes = tuple(train.classes[c] for c in seen)
        step_train = _relabel(train, set(int(c) for c in group), classes)
        step_test = _relabel(test, set(seen), classes)
        fit, val = step_train.holdout(0.1)
        tcfg = TrainConfig(task="cifar100", steps=cfg.steps, seed=cfg.seed + k, template=template, **CIFAR_TRAIN)
        result = train_task(bank, fit, tcfg, val, k + 1, parent, progress=False, reference=find_reference(backbone))
        bundle = read_bundle(result.bundle)
        parent = bundle.id
        bank = build_bank(backbone, [bundle], previous=bank)  # older versions' experts come from `previous`
        cache = TextCache()
        pinned = accuracy_and_routes(bank, step_test, "cifar100", cache, templates=(template,))[0]
        auto = accuracy_and_routes(bank, step_test, AUTO, cache, templates=(template,))[0]
        rows.append({"step": k + 1, "classes": len(classes), "accuracy": pinned, "auto_accuracy": auto})
    acc = [r["accuracy"] for r in rows]
    return {
        "protocol": protocol,
        "prompts": template,
        "backbone": backbone.describe(),
        "steps": rows,
        "avg": round(100 * float(np.mean(acc)), 2),
        "last": round(100 * acc[-1], 2),
        "auto_avg": round(100 * float(np.mean([r["auto_accuracy"] for r in rows])), 2),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _relabel(data: LabelledImages, keep: set[int], classes: tuple[str, ...]) -> LabelledImages:
    """The images of classes `keep`, labelled by position in `classes` (the classes seen so far)."""
    idx = [i for i, y in enumerate(data.labels) if y in keep]
    sub = data.subset(idx)
    return LabelledImages(sub.images, [classes.index(data.classes[y]) for y in sub.labels], classes)


def format_cifar(report: dict[str, Any]) -> str:
    lines = [
        f"# {report['protocol']} (class-incremental, {report['backbone']['arch']})",
        "",
        f"Avg {report['avg']:.2f}, Last {report['last']:.2f} (task pinned); Avg {report['auto_avg']:.2f} auto-routed.",
        "",
        "| step | classes seen | accuracy, pinned | accuracy, auto |",
        "| --- | --- | --- | --- |",
    ]
    for r in report["steps"]:
        lines.append(f"| {r['step']} | {r['classes']} | {100 * r['accuracy']:.1f} | {100 * r['auto_accuracy']:.1f} |")
    return "\n".join(lines) + "\n"

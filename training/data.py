"""Labelled image sets for training: ImageFolder trees (one sub-folder per class) or offline domains."""

from __future__ import annotations

import functools
import logging
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model_store.labels import classes_problem, labels_problems, twin_message
from model_store.pixels import viewed_rgb

from .image_files import IMAGE_SUFFIXES, SUFFIXES, LazyImages, read_rgb
from .progress import progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledImages:
    """Images with integer labels into `classes`: `LabelledImages([PIL images], [0, 2, 1, ...], ("cat", "dog",
    "fox"))`. Checked on construction, so a library caller's mistake is named before any training."""

    images: Sequence[Image.Image]  # a list, or LazyImages
    labels: list[int]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.classes, str) or not all(isinstance(c, str) for c in self.classes):
            raise TypeError(f"classes are a sequence of class names (str), got {self.classes!r:.80}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels: give one label per image")
        n = len(self.classes)
        bad = next(
            (y for y in self.labels if isinstance(y, bool) or not isinstance(y, Integral) or not 0 <= y < n), None
        )
        if bad is not None:
            raise ValueError(
                f"labels are class indices, ints in 0..{n - 1} into classes, got {bad!r:.40}"
                + (f" (its index is classes.index({bad!r}))" if isinstance(bad, str) and bad in self.classes else "")
            )
        if not isinstance(self.images, LazyImages):
            odd = next((im for im in self.images if not isinstance(im, Image.Image)), None)
            if odd is not None:
                hint = " (PIL.Image.fromarray(a) makes one of a uint8 HxWx3 array)" if hasattr(odd, "shape") else ""
                raise TypeError(f"images are PIL images, got {type(odd).__name__}{hint}")
            if any(im.mode != "RGB" for im in self.images):  # as files and the server's images are seen
                object.__setattr__(self, "images", [im if im.mode == "RGB" else viewed_rgb(im) for im in self.images])

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx) -> LabelledImages:
        idx = list(idx)
        images = self.images.take(idx) if isinstance(self.images, LazyImages) else [self.images[i] for i in idx]
        return LabelledImages(images, [self.labels[i] for i in idx], self.classes)

    def per_class(self, limit: int | None) -> LabelledImages:
        """At most `limit` images of each class (the first ones), for dry runs."""
        if limit is None:
            return self
        seen: dict[int, int] = {}
        keep = []
        for i, y in enumerate(self.labels):
            if seen.get(y, 0) < limit:
                seen[y] = seen.get(y, 0) + 1
                keep.append(i)
        return self.subset(keep)

    def with_classes(self, classes: tuple[str, ...]) -> LabelledImages:
        """The same images labelled into `classes`, which must contain every class of this set."""
        missing = [c for c in self.classes if c not in classes]
        if missing:
            raise ValueError(f"classes {missing} are not in {list(classes)}")
        return LabelledImages(self.images, [classes.index(self.classes[y]) for y in self.labels], tuple(classes))

    def holdout(self, fraction: float, seed: int = 0) -> tuple[LabelledImages, LabelledImages]:
        """Split off a stratified held-out part (at least one image per class when a class has two or more)."""
        rng = np.random.default_rng(seed)
        keep, held = [], []
        labels = np.array(self.labels)
        for c in range(len(self.classes)):
            idx = rng.permutation(np.flatnonzero(labels == c))
            k = int(round(len(idx) * fraction)) if len(idx) > 1 else 0
            k = max(k, 1) if len(idx) > 1 else 0
            held += idx[:k].tolist()
            keep += idx[k:].tolist()
        return self.subset(sorted(keep)), self.subset(sorted(held))


def class_name(folder: str) -> str:
    """An ImageFolder folder name as a class name: `_` reads as a space, the name is composed (NFC): macOS writes
    "café" as "cafe" and a combining accent, which answers would return to clients as it is; and spaces at its ends
    are dropped (labels match without them, but answers returned them)."""
    return unicodedata.normalize("NFC", folder.replace("_", " ")).strip()


def _check_class_folders(root: Path, folders: Sequence[Path], found: tuple[str, ...]) -> None:
    """Class names a bundle can hold, checked before any image is read (not after training, at packing)."""
    named: dict[str, list[str]] = {}
    for folder, name in zip(folders, found, strict=True):
        named.setdefault(name, []).append(folder.name)
    clash = next((names for names in named.values() if len(names) > 1), None)
    if clash:
        why = []
        if any("_" in n for n in clash) and len({unicodedata.normalize("NFC", n) for n in clash}) > 1:
            why.append("'_' reads as a space")
        if len({n.replace("_", " ") for n in clash}) > 1:  # then their Unicode forms differ
            why.append("the same letters in two Unicode forms: composed, and with combining accents")
        raise ValueError(
            f"folders {' and '.join(map(ascii, clash))} of {root} both name the class {class_name(clash[0])!r}"
            f"{' (' + '; '.join(why) + ')' if why else ''}: rename one"
        )
    real: dict[Path, list[str]] = {}
    for folder in folders:  # a symlinked folder is fine, two names for one folder are one class twice
        real.setdefault(folder.resolve(), []).append(folder.name)
    same = next((names for names in real.values() if len(names) > 1), None)
    if same:
        raise ValueError(
            f"folders {' and '.join(map(repr, same))} of {root} are the same folder (a symlink): their images "
            "would be both classes; give each class its own images"
        )
    problems = classes_problem(list(found))  # the manifest's own rule, which packing would apply after training
    if problems:
        raise ValueError(f"the class folders of {root} cannot make a task: {problems[0]}")


def load_image_folder(
    root: str | Path,
    classes: tuple[str, ...] | None = None,
    lazy: bool = False,
    skip_bad: bool = False,
    target: int | None = None,
    progress: bool = True,
) -> LabelledImages:
    """Read `root/<class>/*.png|jpg|...` as RGB (eagerly, or on access with `lazy`); JPEGs at the reduced scale
    the server decodes them at for a backbone of input size `target`, when given (`read_rgb`).

    With `classes`, folders must name exactly those. A file that cannot be read as an image is an error that
    names every such file; with `skip_bad` (eager reading only) those files are left out, with a warning.
    `progress=False`: no "read images" bar (shown for 100 files or more), as `train_task(progress=False)`.
    """
    return read_image_folder(list_image_folder(root, classes), lazy, skip_bad, target, progress)


@dataclass(frozen=True)
class FolderListing:
    """An ImageFolder's image files and their labels, checked, before any is decoded."""

    root: Path
    paths: list[Path]
    labels: list[int]
    classes: tuple[str, ...]


def list_image_folder(
    root: str | Path, classes: tuple[str, ...] | None = None, may_also: tuple[str, ...] = (), training: bool = False
) -> FolderListing:
    """`load_image_folder`'s checks of the folders and their classes, which need no image decoded: a command
    runs them before its slow start (a backbone's download) and decodes later. With `classes`, the folders must
    name those, and may also name `may_also` (a new version's validation: its parent's classes, which it answers
    over too); those come after `classes` in the listing's. `training`: also warn of classes far smaller than the
    largest (a task seldom answers them), which says nothing of a validation or test folder."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{root} is a file; give an ImageFolder directory (one sub-folder per class)")
    entries = sorted(root.iterdir())
    folders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    found = tuple(class_name(p.name) for p in folders)
    if not folders:
        raise ValueError(f"image folder {root} has no class sub-folders")
    _say_left_out(root, entries)
    _check_class_folders(root, folders, found)
    if classes is not None:
        _check_classes(root, found, classes, may_also)
        classes += tuple(c for c in found if c not in classes)
    classes = classes or found
    paths, labels, skipped = [], [], Counter()
    for p in folders:
        files = _class_images(p, skipped)
        paths += files
        labels += [classes.index(class_name(p.name))] * len(files)
    if skipped:
        shown = ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items()))
        log.warning("%s: %d files not read (%s); images are read as %s", root, skipped.total(), shown, SUFFIXES)
    counts = np.bincount(labels, minlength=len(classes)) if labels else np.zeros(len(classes), dtype=int)
    single = [c for c, n in zip(classes, counts, strict=True) if n == 1]
    if single:
        log.warning("%s: class(es) %s have one image each: too few to learn, or to validate on", root, some(single))
    small = [f"{c} ({n})" for c, n in zip(classes, counts, strict=True) if 1 < n < counts.max() / 5]
    if training and small:
        log.warning(  # an outside check's classes of 8 and 1 images beside one of 120 were never answered
            "%s: class(es) %s have under a fifth of the largest class's %d images: the task will seldom answer them",
            root,
            some(small),
            counts.max(),
        )
    return FolderListing(root, paths, labels, classes)


def _check_classes(root: Path, found: tuple[str, ...], classes: tuple[str, ...], may_also: tuple[str, ...]) -> None:
    extra = sorted(set(found) - set(classes) - set(may_also))
    missing = sorted(set(classes) - set(found))
    if extra or missing:
        also = f" (and may have the parent version's {len(may_also)})" if may_also else ""
        raise ValueError(  # "does not have the training data's 3 classes: it also has ['omega']" read as a lack
            f"{root} must have the training data's {len(classes)} classes{also}, no more and no fewer: "
            + "; ".join(
                f"{what} {some(names, 10)}"
                for what, names in (("it has classes the training data lacks:", extra), ("it lacks", missing))
                if names
            )
        )


def _say_left_out(root: Path, entries: Sequence[Path]) -> None:
    """A warning naming what at the top of an ImageFolder is no class: images beside the class folders (a class
    is a folder), folders whose name starts with a dot (hidden: `.net` is one too), and links to nothing."""
    loose = sum(1 for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    hidden = [p.name for p in entries if p.is_dir() and p.name.startswith(".")]
    broken = [p.name for p in entries if p.is_symlink() and not p.exists()]  # a class folder gone, and no word of it
    if broken:
        log.warning(
            "%s: links %s lead to nothing and are not read (a class folder moved or deleted?)", root, some(broken)
        )
    if loose:
        log.warning("%s: %d image(s) beside the class folders not read (a class is a sub-folder)", root, loose)
    if hidden:
        log.warning("%s: folders %s start with a dot and are no classes (hidden)", root, some(hidden))


def read_image_folder(
    listing: FolderListing, lazy: bool = False, skip_bad: bool = False, target: int | None = None, progress: bool = True
) -> LabelledImages:
    """The listed images, as `load_image_folder` reads them."""
    paths, labels, classes = listing.paths, listing.labels, listing.classes
    if lazy:
        return LabelledImages(LazyImages(paths, functools.partial(read_rgb, target=target)), labels, classes)
    images, kept = _read_all(paths, skip_bad, target, progress)
    labels = [labels[i] for i in kept]
    empty = [c for c, n in zip(classes, np.bincount(labels, minlength=len(classes)), strict=True) if n == 0]
    if empty:
        raise ValueError(
            f"{listing.root}: class(es) {some(empty)} have no readable image once the bad files are left out: add "
            "images to them or remove their folders"
        )
    after, before = (np.bincount(x, minlength=len(classes)) for x in (labels, listing.labels))
    single = [c for c, n, had in zip(classes, after, before, strict=True) if n == 1 < had]  # listing told of the rest
    if single:
        log.warning(
            "%s: class(es) %s have one image once the bad files are left out: too few to learn, or to validate on",
            listing.root,
            some(single),
        )
    return LabelledImages(images, labels, classes)


def _read_all(
    paths: Sequence[Path], skip_bad: bool = False, target: int | None = None, progress: bool = True
) -> tuple[list[Image.Image], list[int]]:
    """The images, and the indices into `paths` they were read from; or one ValueError naming every file that
    cannot be used (not one per run). With `skip_bad`, those files are left out with one warning instead."""
    images, kept, problems = [], [], []
    # large folders took a minute, silent, before training said a word (an outside check); small ones stay quiet
    quiet = not progress or len(paths) < 100
    for i, f in enumerate(progress_bar(paths, desc="read images", unit="image", leave=False, disable=quiet)):
        try:
            images.append(read_rgb(f, target))
            kept.append(i)
        except ValueError as e:
            problems.append(str(e))
    report_unreadable(problems, len(paths), skip_bad, "clipbank train --skip-bad`, or in Python `skip_bad=True")
    return images, kept


def readable_files(paths: Sequence[Path], skip_bad: bool = False, flag: str = "--skip-bad") -> list[Path]:
    """The files of `paths` that read as images (each read once, then let go: for sets too large to hold); the
    others are named as `report_unreadable` does."""
    kept, problems = [], []
    for f in paths:
        try:
            read_rgb(f).close()
            kept.append(f)
        except ValueError as e:
            problems.append(str(e))
    report_unreadable(problems, len(paths), skip_bad, flag)
    return kept


def report_unreadable(problems: Sequence[str], total: int, skip_bad: bool, flag: str) -> None:
    """Nothing if no file failed; else one warning (`skip_bad`) or one ValueError naming them all, with `flag`
    (the command and option that leave such files out)."""
    if not problems:
        return
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    if skip_bad:
        log.warning("%d of %d images cannot be used and are left out: %s", len(problems), total, shown)
        return
    hint = f" (`{flag}` leaves such files out)"
    if len(problems) == 1:
        raise ValueError(problems[0] + hint)
    raise ValueError(f"{len(problems)} of {total} images cannot be used: {shown}{hint}")


def some(names: Sequence[str], n: int = 5) -> str:
    """The first `n` names as a list, and how many there are when it is cut: `['a', 'b', ... 7 in all]`."""
    return "[" + ", ".join(map(repr, names[:n])) + (f", ... {len(names)} in all]" if len(names) > n else "]")


def _class_images(folder: Path, skipped: Counter) -> list[Path]:
    """A class folder's images, in order; what is not read is counted in `skipped` (by suffix, or 'in
    sub-folders'). Hidden files (macOS's ._x.png, say) are not images. ValueError when it holds no image."""
    files, others, nested = [], Counter(), 0
    for f in sorted(folder.iterdir()):
        if f.name.startswith("."):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:  # counted: they were left out without a word
                others["hidden"] += 1
            continue
        if f.is_dir():
            nested += sum(1 for g in f.rglob("*") if g.suffix.lower() in IMAGE_SUFFIXES)
        elif f.suffix.lower() in IMAGE_SUFFIXES:
            files.append(f)
        else:
            others[f".{f.suffix.lower().lstrip('.')}" if f.suffix else "without a suffix"] += 1
    if not files and nested:
        raise ValueError(
            f"class folder {folder} holds no images, but its sub-folders do ({nested}): if they are the classes, "
            f"give {folder} itself as the image folder; else put the images in {folder} directly"
        )
    if not files:
        found = f"; it holds {', '.join(f'{n} {k}' for k, n in sorted(others.items()))}" if others else ""
        raise ValueError(f"class folder {folder} holds no images ({SUFFIXES}){found}; remove it or add images")
    skipped.update(others)
    if nested:
        skipped["in sub-folders (only a class folder's own files are read)"] += nested
    return files


def load_domain(name: str, split: str) -> LabelledImages:
    from .domains import get_domain

    domain = get_domain(name)
    images, labels = domain.split(split)
    return LabelledImages(images, labels, domain.classes)


def checked_split(
    train: LabelledImages, val: LabelledImages | None, cfg: Any, backbone: Any
) -> tuple[LabelledImages, LabelledImages]:
    """(training, validation) images, or a ValueError now for what would fail only after training: a bundle that
    could not be packed or loaded, nothing to hold out for the selector's calibration and the report. `cfg`: the
    task's TrainConfig; `backbone`: what it trains on."""
    from model_store.compat import rank_problem  # torch: not at this module's import
    from model_store.text import tokenizer_twins

    if problem := rank_problem(cfg.rank, backbone):
        raise ValueError(f"task {cfg.task}: {problem}")
    if len(train.classes) < 2:
        raise ValueError(f"a task needs at least 2 classes, got {list(train.classes)}")
    problems = labels_problems(list(train.classes), list(cfg.serving_templates))
    if problems:
        raise ValueError(f"task {cfg.task}: " + "; ".join(problems))
    for templates in {(cfg.template,), tuple(cfg.serving_templates)}:  # the training prompt and the bundle's
        twins = tokenizer_twins(backbone.tokenizer, train.classes, templates)
        if twins is not None:
            raise ValueError(f"task {cfg.task}: classes {twin_message(twins)} (rename a class folder)")
    fit = train
    if val is None:
        fit, val = train.holdout(cfg.val_fraction, cfg.seed)
        if not len(val):
            raise ValueError(
                "no class has 2 images, so none can be held out for validation: add images, or give a validation "
                "set (--val; val= in Python)"
            )
    if not len(val):
        raise ValueError("the validation set is empty")
    if not len(fit):
        raise ValueError(
            f"no training image is left once {len(val)} are held out for validation: add images, or lower "
            f"val_fraction ({cfg.val_fraction})"
        )
    if set(val.classes) != set(train.classes):  # its accuracy would be over another task's classes
        shown = sorted(set(val.classes) ^ set(train.classes))[:10]
        raise ValueError(f"the validation set's classes are not the training set's: {shown} are in only one of them")
    return fit, val

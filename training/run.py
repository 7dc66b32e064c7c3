"""One training job as the CLI runs it: backbone, bank from the store, data, train, write and store the bundle."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch

from model_store.backbone import Backbone, load_backbone
from model_store.bank import BankSnapshot, empty_bank
from model_store.errors import BackboneMismatch, MissingExpert, TaskNotFound, VersionConflict
from model_store.gate import GateReport, trusted_serving
from model_store.loader import BankLoader
from model_store.manifest import MAX_VERSION
from model_store.reference import find_reference
from model_store.replacement import stored_replacement_notes
from model_store.selector import SelectorConfig
from model_store.store import LocalStore, atomic_write, open_store
from model_store.store_base import PutResult, Store

from .config import TrainJob
from .data import list_image_folder, read_image_folder
from .trainer import TrainConfig, train_task
from .validation import warn_if_val_copies_data

log = logging.getLogger(__name__)


def train_config(job: TrainJob) -> TrainConfig:
    """The trainer's settings from the command's (`--templates` is '|'-separated)."""
    same = ("task", "steps", "batch_size", "lr", "new_experts", "expert_blocks", "seed", "template")
    templates = tuple(t.strip() for t in (job.templates or "").split("|") if t.strip())
    if job.templates is not None and not templates:
        raise ValueError(f"--templates {job.templates!r} names no template: give 'a photo of a {{}}.|...'")
    if job.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: PyTorch's default), got {job.threads}")
    return TrainConfig(
        **{k: getattr(job, k) for k in same}, templates=templates, selector=SelectorConfig(kind=job.selector)
    )


def run_train_job(job: TrainJob) -> dict[str, Any]:
    """Train `job.task` and return a summary; the bundle goes to `job.out` and/or `job.store`. Its `warnings` hold
    what was said about the data and the store (files not read, a class of one image, a new store) as well as
    the routing's: a script reading the summary alone sees them too."""
    noted: list[str] = []
    made = job.store is not None and "://" not in job.store and not Path(job.store).exists()
    missing = _missing_folders(Path(job.out).parent) if job.out else []  # made by the --out check
    try:
        with _noting_warnings(noted):
            summary = _train_and_store(job)
    except BaseException:  # Ctrl-C too
        if made:
            _remove_if_unused(Path(job.store))
        for folder in missing:  # deepest first; only those still empty (an outside check found them left)
            with suppress(OSError):
                folder.rmdir()
        raise
    summary["warnings"] = list(dict.fromkeys(noted + summary["warnings"]))  # each once, in the order said
    return summary


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_if_unused(root: Path) -> None:
    """The store folder this run made, when it failed before storing anything: it held only `.lock` and an empty
    `blobs/`, left to look like a store."""
    blobs = root / "blobs"
    try:
        if {p.name for p in root.iterdir()} <= {".lock", "blobs"} and not (blobs.is_dir() and any(blobs.iterdir())):
            if blobs.is_dir():
                blobs.rmdir()
            (root / ".lock").unlink(missing_ok=True)
            root.rmdir()
    except OSError:  # gone, or no longer empty: left as it is
        pass


class _Noted(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@contextmanager
def _noting_warnings(into: list[str]) -> Iterator[None]:
    """The data's and the store's warnings, still logged, also kept in `into`."""
    handler, loggers = _Noted(into), [logging.getLogger(name) for name in ("training.data", __name__)]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def _bank_of(store: Store | None, backbone: Backbone) -> BankSnapshot:
    """The store's bank the new task trains beside; its tasks left out are said (another backbone's store
    trained with an empty bank, silently: `bank_tasks` was [] and the old task degraded on every server)."""
    if store is None:
        return empty_bank(backbone)
    bank = BankLoader(store, backbone).load()
    for task, why in bank.degraded.items():
        log.warning("task %s of the store is left out of the bank this task trains beside: %s", task, why)
    if other := sorted(t for t, why in bank.degraded.items() if why.startswith(BackboneMismatch.code)):
        # refused before training: stored, the version went active and the store's servers took its task offline
        raise BackboneMismatch(
            f"store {store.location} holds tasks of another backbone than {backbone.ref.text} ({', '.join(other)}): "
            "the servers of that store would not serve this version (backbone_mismatch); give each backbone its "
            "own store (--store with a new folder), or train with --out"
        )
    return bank


def busy_machine(load: float | None = None, cores: int | None = None) -> str | None:
    """A hint when other work keeps the cores busy and training would take one thread per core: an outside check's
    100 steps took 226 s so on a 2-core machine at a load of 5, and 34 s with `--threads 1`."""
    cores = cores or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this platform
            return None
    if cores < 2 or load < cores:
        return None
    return (
        f"this machine is busy (load {load:.1f} on {cores} cores): training with one thread per core may run many "
        "times slower than with --threads 1"
    )


def _train_and_store(job: TrainJob) -> dict[str, Any]:
    cfg = train_config(job)
    _check_outputs(job)  # before training, not after it
    store = _open_store(job.store) if job.store else None
    _warn_if_val_is_data(job)
    version, parent, seen = _next_version(store, job)
    listed = list_image_folder(job.data, training=True)  # the folders' faults at once, before a backbone's download
    # a new version answers over its parent's classes too: its validation may hold them, and so show forgetting
    listed_val = list_image_folder(job.val, listed.classes, seen) if job.val else None
    if listed_val is not None and Path(job.val).resolve() != Path(job.data).resolve():
        warn_if_val_copies_data(listed, listed_val)
    if job.threads:
        torch.set_num_threads(job.threads)
    elif job.progress and (busy := busy_machine()):
        print(busy, file=sys.stderr)
    backbone = load_backbone(job.backbone, job.device)  # then decoded: its input size sets how JPEGs are
    train, val = (
        read_image_folder(x, skip_bad=job.skip_bad, target=backbone.image_size) if x else None
        for x in (listed, listed_val)
    )
    reference = find_reference(backbone, job.reference)  # before any training: a wrong path fails at once
    bank = _bank_of(store, backbone)
    result = train_task(  # a new version answers over its parent's classes too (`seen`, read from the store)
        bank, train, cfg, val, version, parent, job.progress, reference, parent_classes=seen if parent else None
    )
    summary = {
        "task": job.task,
        "version": version,
        "classes": result.report["classes"],
        "bank_tasks": list(bank.task_names),
        **{
            k: result.report[k]
            for k in (
                "zero_shot_val_accuracy",
                "val_accuracy",
                "val_balanced_accuracy",
                "val_accuracy_per_class",
                "seconds",
                "train_images",
                "val_images",
                "bundle_bytes",
                "experts_added",
            )
        },
        "selector": {"kind": result.report["selector"]["kind"], "threshold": result.report["selector"]["threshold"]},
        "routing": result.report["routing"],
        "warnings": result.report["warnings"],
    }
    if job.out:
        with _kept_on_failure(result.bundle, job.task, version, f"writing --out {job.out}", None):
            atomic_write(Path(job.out), result.bundle, exclusive=not job.overwrite)
        summary["out"] = job.out
    if store is not None:
        _store_trained(store, result.bundle, job, version, bank, summary)
    return summary


def _store_trained(store: Store, bundle: bytes, job: TrainJob, version: int, bank: BankSnapshot, summary: dict) -> None:
    """Put the bundle in the store with the gate's report of it, inactive when a server's gate (default limits) would
    refuse it (unless forced), as a server leaves an upload it refuses: what serves keeps serving (an outside
    check's `train --store` activated one that took 9% of an older task's images, marked nowhere after). The
    report is a preview (a server's limits may be others): kept, marked so, and no licence for the next version."""
    preview, before = summary["routing"].get("gate"), store.index()
    gate = None
    if preview is not None:
        report = GateReport.from_json(preview)
        if trusted_serving(bank, before, job.task) is None:  # what the serving version takes counts too
            report = report.without_licence()
        gate = {**report.to_json(), "preview": True}
    held = job.activate and not job.force and bool(gate and gate["offences"])
    activate = job.activate and not held
    put = _put(store, bundle, job, version, activate, gate)
    summary.update(bundle_id=put.bundle_id, store=store.location, generation=put.generation, activated=activate)
    for note in stored_replacement_notes(store, before, job.task, version, not activate):  # as push says them: an
        log.warning("%s", note)  # outside check's v2 at 81% replaced a v1 at 95% with nothing said
        summary["warnings"].append(note)
    if held:
        serving = "the version serving keeps serving" if job.task in bank.task_names else "nothing serves the task"
        said = (
            f"version {version} of {job.task} is stored inactive: a server's interference gate (default limits) "
            f"would refuse it ({'; '.join(gate['offences'])}); {serving}. `clipbank tasks activate {job.task} "
            f"{version} --force` (a server) or `clipbank store activate` (this folder, ungated) makes it serve "
            "anyway; `--force` here would have"
        )
        log.warning("%s", said)
        summary["gate_refused"] = True
        summary["warnings"].append(said)


def _put(store: Store, bundle: bytes, job: TrainJob, version: int, activate: bool, gate: dict | None) -> PutResult:
    """Store the trained bundle (with the gate's report of it, when measured). Another writer may have taken this
    version, a purge removed experts it uses, the store was busy...: the bundle is then kept on disk, not lost with
    the error."""
    with _kept_on_failure(bundle, job.task, version, "the store refused the bundle", job.out):
        try:
            return store.put(bundle, activate=activate, gate=gate)
        except VersionConflict:
            raise VersionConflict(
                f"another writer stored version {version} of task {job.task!r} while this run trained it: a store or "
                "server takes this bundle only as a newer version, so train again with --store"
            ) from None


@contextmanager
def _kept_on_failure(bundle: bytes, task: str, version: int, what: str, written: str | None) -> Iterator[None]:
    """On an error inside: log it, save the bundle (unless already `written`) and name the file; re-raise."""
    try:
        yield
    except Exception as e:
        log.error("%s: %s: %s", what, type(e).__name__, e)
        kept = written or _keep_unstored(bundle, task, version)
        if isinstance(e, (VersionConflict, MissingExpert)):  # no store would take it as it is
            log.error("the trained bundle is saved at %s", kept)
        else:
            log.error("the trained bundle is saved at %s (push it to a server with `clipbank push`)", kept)
        raise


def _check_outputs(job: TrainJob) -> None:
    """Somewhere to put the bundle, `--version` and `--out`: checked before any work."""
    if not job.out and not job.store:  # the bundle would be trained, then dropped
        raise ValueError("a training job needs out (a bundle file), store (a store to put it in), or both")
    if job.version is not None and (job.store or not 1 <= job.version <= MAX_VERSION):
        raise ValueError(
            "--version sets a bundle's version without --store (with it, the store's next is used)"
            if job.store
            else f"--version must be in [1, {MAX_VERSION}], got {job.version}"
        )
    if not job.activate and not job.store:
        raise ValueError(
            "--no-activate applies to the version put in --store; a bundle file is stored inactive when pushed with "
            "`clipbank push --no-activate`"
        )
    if job.force and not job.store:
        raise ValueError("--force activates the version put in --store; a bundle file is gated by `clipbank push`")
    if job.out:
        check_writable(Path(job.out), job.overwrite)


def _warn_if_val_is_data(job: TrainJob) -> None:
    if job.val and Path(job.val).resolve() == Path(job.data).resolve():
        log.warning(
            "--val is --data's folder: validation accuracy and the selector's threshold are then measured on "
            "the training images, and overstate what the task will do"
        )


def _open_store(location: str) -> Store:
    """The store, opened before any work: a store no change can be made to (read-only, its lock not creatable)
    fails now, not after training; a folder or S3 prefix that holds no store (a typo?) is said to become a new one."""
    fresh = "://" not in location and not any((Path(location) / n).exists() for n in ("index.json", "blobs"))
    store = open_store(location)  # a file, an unknown scheme: refused before any warning
    if isinstance(store, LocalStore):
        with store.locked():
            pass
    elif not store.exists():
        fresh = True
    if fresh:
        log.warning(
            "no store at %s: a new, empty one is made there, and the task is trained on an empty bank (if you meant "
            "an existing store, stop now and check the path)",
            location,
        )
    return store


def check_writable(out: Path, overwrite: bool, what: str = "the bundle file") -> None:
    """`--out` before any work: not a folder, not an existing file unless `overwrite`, in a folder we may write."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give {what}'s path")
    if out.exists() and not overwrite:  # it may be another task's bundle, and the only copy of it
        raise FileExistsError(f"--out {out} exists; give a new file name, or --overwrite to replace it")
    writable_folder(out.parent, "--out")


def writable_folder(folder: Path, flag: str) -> None:
    """`folder` made if missing and written into once (a real file: access() says yes as root, and in /proc), or an
    OSError naming `flag`; checked before the work whose results would go there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".clipbank-probe-"):
            pass
    except OSError as e:
        raise type(e)(f"{flag}: cannot make or write in {folder} ({e.strerror or e})") from None


def _keep_unstored(bundle: bytes, task: str, version: int) -> str:
    """The bundle written where it can be found again, under a name no earlier run took: the working directory,
    else the temporary one."""
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        try:
            for _ in range(10):  # another run may take the free name first
                path = _free_name(folder, f"{task}-v{version}-unstored")
                try:
                    atomic_write(path, bundle, exclusive=True)
                    return str(path)
                except FileExistsError:
                    continue
        except OSError:
            continue
    raise OSError(f"the trained bundle could not be written to {Path.cwd()} nor {tempfile.gettempdir()}")


def _free_name(folder: Path, stem: str) -> Path:
    for n in range(1, 10_000):
        path = folder / f"{stem}{'' if n == 1 else f'-{n}'}.safetensors"
        if not path.exists():
            return path
    raise OSError(f"{folder} holds 9,999 files named {stem}*")


def _next_version(store: Store | None, job: TrainJob) -> tuple[int, str | None, tuple[str, ...]]:
    """(the version to train, its parent: the task's active bundle in `store`, and the parent's classes, which the
    new version answers over), checked before any work."""
    version, parent = job.version or 1, None
    if store is not None:
        try:
            entry = store.task(job.task)
            version, parent = entry.newest + 1, entry.active
        except TaskNotFound:
            pass
    if version > MAX_VERSION:  # before training, not when the bundle is packed
        raise ValueError(f"task {job.task!r} is at version {version - 1}, the last a bundle can have ({MAX_VERSION})")
    return version, parent, store.load(parent).manifest.classes if parent is not None else ()

"""The quickest end-to-end run, offline: export domains, train two tasks into a store, route mixed test images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from model_store.backbone import load_backbone
from model_store.errors import ClipbankError
from model_store.loader import BankLoader
from model_store.store import open_store

from .data import load_domain
from .evaluate import format_route_report, route_report
from .export import export_domain
from .run import TrainJob, run_train_job

DEMO_TASKS = ("textures", "glyphs")


def run_demo(
    workdir: Path, steps: int = 500, backbone: str = "tiny", tasks: tuple[str, ...] = DEMO_TASKS, threads: int = 0
) -> dict:
    """Train `tasks` one after the other on one store, then report routing on their test sets and on shapes."""
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: one per core), got {threads}")
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"--workdir {workdir} is a file; give a folder (made if missing)")
    store_dir = workdir / "store"
    for name in tasks:
        exported(name, workdir / "data" / name)
        store = open_store(store_dir)
        if name in store.active():
            _kept(store, name, steps)
            continue
        summary = run_train_job(
            TrainJob(
                task=name,
                data=str(workdir / "data" / name / "train"),
                val=str(workdir / "data" / name / "val"),
                backbone=backbone,
                store=str(store_dir),
                steps=steps,
                threads=threads,  # the busy-machine advice names --threads: the demo takes it too (an outside check)
            )
        )
        print(
            f"{name}: val accuracy zero-shot {summary['zero_shot_val_accuracy']:.1%} -> trained "
            f"{summary['val_accuracy']:.1%} in {summary['seconds']:.0f}s, bundle {summary['bundle_bytes']} bytes"
            + (" (stored inactive: the interference gate would refuse it)" if summary.get("gate_refused") else "")
        )
    bank = BankLoader(open_store(store_dir), load_backbone(backbone)).load()
    sets = {name: load_domain(name, "test") for name in (*tasks, "shapes")}
    report = route_report(bank, sets)
    print(format_route_report(report))
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _kept(store, name: str, steps: int) -> None:
    """Say that `name` is not trained again, and when the stored version was trained otherwise than asked now."""
    print(f"{name}: already in {store.location}, skipping training")
    try:
        trained = store.load(store.active()[name]).manifest.training or {}
    except (ClipbankError, OSError):  # a damaged blob: the bank's loading says so below
        return
    if trained.get("steps") not in (None, steps):
        print(
            f"  its stored version was trained with {trained['steps']} steps, not the --steps {steps} asked now: "
            "the figures below are that version's (give another --workdir to train again)"
        )


def exported(name: str, folder: Path) -> Path:
    """`folder` holding the domain's export: made once (`export_domain` leaves no half export behind), so a second
    run uses the first one's."""
    if not folder.is_dir():
        shutil.rmtree(folder.with_name(folder.name + ".part"), ignore_errors=True)  # left by releases before this
        export_domain(name, folder)
    return folder

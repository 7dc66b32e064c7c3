"""`clipbank store`: inspect, check or change a store without a server (a folder, or s3://)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model_store.errors import ClipbankError
from model_store.settings import env_value
from service.config import ServeConfig

from .flags import version_number
from .output import print_json
from .server_commands import print_deactivated
from .tables import index_tasks, print_tasks


def _store(args: argparse.Namespace) -> int:
    from model_store.store import open_store

    local = "://" not in args.store
    if local and not any((Path(args.store) / name).exists() for name in ("index.json", "blobs")):
        # a typo, or any other folder, would become a new, empty store
        what = ": it is a file" if Path(args.store).is_file() else ""
        raise FileNotFoundError(f"no store at {args.store!r}{what} (a store folder holds index.json and blobs/)")
    if args.store_cmd == "check":
        return _check(args, local)
    store = open_store(args.store)
    if not local and not store.exists():  # a mistyped prefix reads as an empty store, and a change would make one
        raise FileNotFoundError(f"no store at {args.store!r} (no index.json under that prefix)")
    if args.store_cmd == "list" and args.json:
        print_json(store.index().to_json())
    elif args.store_cmd == "list":
        index = store.index()
        print_tasks(index.generation, index_tasks(index), f"store {args.store}")
    elif args.store_cmd == "activate":
        _readable(store, args.task, args.version)
        bundle = store.activate(args.task, args.version)
        print(f"task {args.task}: version {args.version} is active (bundle {bundle[:12]}), ungated")
    elif args.store_cmd == "deactivate":
        print_deactivated(_deactivate(store, args.task, args.purge), args.purge)
    elif args.store_cmd == "clean":
        gone = store.sweep()  # on S3 those written over an hour ago: a newer one may be a put's in flight
        old = "" if local else " (written over an hour ago: a newer one may be an upload in flight)"
        print(
            f"store {args.store}: {gone['temp_files']} temp file(s) and {gone['unreferenced_blobs']} blob(s) no "
            f"version names{old} deleted"
        )
    return 0


def _check(args: argparse.Namespace, local: bool) -> int:
    """`store check`: each problem on stdout (exit 1), what it checked and leftovers on stderr; `--json`, one
    object `{"problems", "leftovers", "consistent"}` on stdout (a script's: an outside check parsed the lines)."""
    from model_store.store import open_store
    from model_store.store_check import check_store, store_leftovers

    if not local:  # its bytes, not parsed: a corrupt index is the check's to report (it was exit 2, "see the log")
        remote = open_store(args.store)
        if remote.raw_index() is None and next(iter(remote.blob_names()), None) is None:
            raise FileNotFoundError(f"no store at {args.store!r} (no index.json under that prefix)")
    problems = check_store(args.store)  # on S3: every blob as the bucket holds it, past this machine's cache
    if args.backbone:
        problems += _unservable(args.store, args.backbone)
    if args.json:
        left = store_leftovers(args.store)
        print_json({"problems": problems, "leftovers": left, "consistent": not problems})
        return 1 if problems else 0
    for problem in problems:
        print(problem)
    said = f"{len(problems)} problem(s)" if problems else "the store is consistent"
    if not args.backbone:  # a store whole on disk can still hold versions a server would not serve
        said += " (blobs and index only; --backbone REF also checks that a server on REF serves every version)"
    print(said, file=sys.stderr)
    if not problems and any((left := store_leftovers(args.store)).values()):  # not faults, but disk space
        how = (  # on S3 a put's object may be in flight: what is over an hour old is deleted
            "`clipbank store clean`, or any purge, deletes those written over an hour ago"
            if str(args.store).startswith("s3://")
            else "`clipbank store clean` deletes them; so does any purge"
        )
        print(
            f"leftovers: {left['temp_files']} temp file(s), {left['unreferenced_blobs']} blob(s) no version names "
            f"({how})",
            file=sys.stderr,
        )
    return 1 if problems else 0


def _readable(store, task: str, version: int) -> None:
    """Read and verify the version's bundle and the bundles whose experts it uses, as a server will: a damaged
    one would take the task offline (StoreDamaged, BundleError or MissingExpert, naming it)."""
    from model_store.errors import StoreDamaged
    from model_store.loader import BankLoader

    loader = BankLoader(store, None)  # no bank is built: bundles read and checked against their names only
    bundle_id = store.version(task, version).bundle_id
    bundle = loader.bundle(bundle_id)
    needed = {bundle_id, *(b.id for b in loader.providers([bundle]))}
    if hasattr(store, "blob_names") and (gone := needed - set(store.blob_names())):  # S3: read from this machine's
        raise StoreDamaged(  # cache, a blob deleted from the bucket passed; a fresh server would degrade the task
            f"task {task} version {version} needs blob(s) {', '.join(sorted(b[:12] for b in gone))}, which the bucket "
            "no longer holds (this machine's cache still does): upload the version's bundle again to restore them"
        )
    mine = bundle.manifest.backbone
    others = {t: _backbone_of(loader, b) for t, b in store.active().items() if t != task}
    if other := sorted(t for t, info in others.items() if info is not None and info.fingerprint != mine.fingerprint):
        from model_store.errors import BackboneMismatch

        # a server serves one backbone: activated, this version (or those tasks) would be taken offline
        raise BackboneMismatch(
            f"task {task} version {version} was trained on another backbone ({mine.arch}/{mine.pretrained}, "
            f"{mine.fingerprint[:12]}) than the store's active tasks {', '.join(other)}: no server would serve "
            "both; give each backbone its own store"
        )


def _backbone_of(loader, bundle_id: str):
    """The backbone a stored bundle was trained on; None if it cannot be read (`store check` says why)."""
    from model_store.bundle import read_manifest

    try:  # the manifest alone: no tensors parsed
        return read_manifest(loader.store.read(bundle_id)).backbone
    except ClipbankError:
        return None


def _deactivate(store, task: str, purge: bool) -> dict:
    """`DELETE /tasks/{task}` done on the store itself: what the server would answer, for the same message."""
    from model_store.store_base import needed_by

    record = store.index().task(task)  # TaskNotFound names it
    shadow = None if purge else record.record_of(record.shadow)
    if purge:  # one index write: killed between a deactivation and a purge, it was left deactivated, unpurged
        gone = store.purge(task, deactivate=True)
    else:
        store.deactivate(task)
        gone = 0
    index = store.index()
    return {
        "task": task,
        "was_active": record.active is not None,
        "shadow_version": shadow.version if shadow is not None else None,
        "purged_blobs": gone,
        "kept": needed_by(index, task) if purge else {},
        "generation": index.generation,
    }


def _unservable(location: str, ref: str) -> list[str]:
    """The active and shadow versions a server on backbone `ref` would not serve (another backbone's bundles, or
    the same weights computing otherwise): what it would report degraded. Unreadable blobs are check_store's."""
    from model_store.backbone import load_backbone
    from model_store.bundle import read_manifest
    from model_store.compat import check_backbone
    from model_store.errors import BackboneMismatch
    from model_store.store import open_store

    backbone, store, problems = load_backbone(ref, "cpu"), open_store(location), []
    for task, record in sorted(store.index().tasks.items()):
        for what, bundle_id in (("active", record.active), ("shadow", record.shadow)):
            try:
                if bundle_id is not None:
                    check_backbone(read_manifest(store.read(bundle_id)).backbone, backbone)
            except BackboneMismatch as e:
                problems.append(f"task {task} ({what} version): not served on {ref}: {e}")
            except ClipbankError:  # missing or damaged: said above
                continue
    return problems


def add_store_parser(sub) -> None:
    s = sub.add_parser("store", help="inspect, check or change a store (a folder, or s3://)")
    s.add_argument(
        "--store",
        default=env_value("store") or ServeConfig.store,
        help=f"($CLIPBANK_STORE, default {ServeConfig.store})",
    )
    ssub = s.add_subparsers(dest="store_cmd", required=True)
    ls = ssub.add_parser("list", help="the stored tasks and versions, which is active, their sizes and accuracy")
    ls.add_argument("--json", action="store_true", help="print the store's whole index as JSON instead")
    ck = ssub.add_parser("check", help="report what is damaged or inconsistent (exit 1 if anything is)")
    ck.add_argument(
        "--backbone", help="also name the active versions a server on this backbone would not serve (before a switch)"
    )
    ck.add_argument("--json", action="store_true", help='print {"problems", "leftovers", "consistent"} as JSON')
    a = ssub.add_parser("activate", help="make a stored version active (not gated: the server's gate is its own)")
    a.add_argument("task")
    a.add_argument("version", type=version_number)
    dd = ssub.add_parser("deactivate", help="stop routing to a task (its versions stay stored)")
    dd.add_argument("task")
    dd.add_argument(
        "--purge",
        action="store_true",
        help="also forget the task and delete its bundles (and blobs no version names), except versions whose "
        "experts other tasks use; no rollback to them after",
    )
    ssub.add_parser(
        "clean", help="delete what killed writers left: temp files, blobs no version names (on s3://, over an hour old)"
    )
    for p in ssub.choices.values():  # `store list --store DIR` as well as `store --store DIR list`
        p.add_argument("--store", default=argparse.SUPPRESS, help="the store (also before the sub-command)")
    s.set_defaults(fn=_store)

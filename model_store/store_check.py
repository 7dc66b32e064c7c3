"""`clipbank store check`: every problem of a store, a folder or an S3 prefix, read as stored (past any cache)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .bundle import read_manifest
from .digest import bytes_digest
from .errors import BundleNotFound, ClipbankError, StoreError
from .files import read_regular
from .manifest import shown
from .store import BLOB_NAME, open_store, stale_temp_files
from .store_index import StoreIndex, TaskRecord

LIST_FIELDS = {"experts_new": "empty", "uses": "empty", "classes": "unknown"}  # -> what the parser reads instead


CHECK_TRIES = 5  # checks of a store that other processes keep changing


class _Contents:
    """What a store holds, read past any cache: its index's bytes (None: there is none) and its blobs by name."""

    def __init__(self, location: str | os.PathLike) -> None:
        text = str(location)
        if text.startswith("s3://"):
            store = open_store(text)  # an S3Store: blobs fetched from the bucket, not this machine's cache
            self.index: Callable[[], bytes | None] = store.raw_index
            self.names: Callable[[], Iterable[str]] = store.blob_names
            self.blob: Callable[[str], bytes] = store.fetch_blob
            self.temp: Callable[[], int] = lambda: 0  # objects are written whole: no temp files
            self.layout: Callable[[], list[str]] = list
            return
        root = Path(text)
        self.index = lambda: read_regular(root / "index.json") if (root / "index.json").exists() else None
        self.names = lambda: (p.stem for p in (root / "blobs").glob("*.safetensors"))
        self.blob = lambda name: read_regular(root / "blobs" / f"{name}.safetensors")
        self.temp = lambda: len(stale_temp_files(root))
        self.layout = lambda: _layout_problems(root)


def _layout_problems(root: Path) -> list[str]:
    """The folder's own files in the wrong shape: every change fails (a `.lock` folder passed the check)."""
    problems = []
    if (root / ".lock").exists() and not (root / ".lock").is_file():
        problems.append(".lock is not a file: every change fails to lock the store (remove it; no process holds it)")
    if (root / "blobs").exists() and not (root / "blobs").is_dir():
        problems.append("blobs is not a folder: no bundle can be read or written (move it away)")
    return problems


def check_store(location: str | os.PathLike) -> list[str]:
    """Every problem of the store at `location` (a folder, or `s3://bucket/prefix`: every blob is downloaded), empty
    when consistent.

    Temp files and whole blobs the index does not name are not problems (a killed writer may leave them; the
    next writer removes the temp files): `store_leftovers` counts them.
    """
    contents = _Contents(location)
    for _ in range(CHECK_TRIES):  # the index first, then the blobs, then the index again: one state, not a mixture
        try:
            data = contents.index()
        except OSError as e:
            return [*contents.layout(), f"index.json cannot be read: {type(e).__name__}: {e.strerror or e}"]
        problems = _check(contents, data)
        try:
            if contents.index() == data:
                return problems
        except OSError:
            return problems
    return [
        *problems,
        f"the store changed while it was checked, {CHECK_TRIES} times: check it again when it is quieter",
    ]


def _check(contents: _Contents, data: bytes | None) -> list[str]:
    """`check_store` on the index `data`, read just before the blobs are listed (a put writes its blob before the
    index names it, so a blob listed and not named is a leftover; a blob named and gone by the index's next read is
    a purge's, and the check runs again: an outside check was told, during a purge, to upload a blob again)."""
    layout = contents.layout()
    names = sorted(n for n in contents.names() if BLOB_NAME.fullmatch(n))  # else an operator's file: left alone
    if data is None:
        lost = [f"index.json is missing but blobs/ holds {len(names)} bundles: the index was lost"] if names else []
        return layout + lost
    try:
        index = json.loads(data)
    except (ValueError, RecursionError) as e:
        return [*layout, f"index.json does not parse: {str(e)[:120]}"]
    try:  # the server's own parser: what it refuses, `store list` and every change refuse too
        typed = StoreIndex.from_json(index)
    except StoreError as e:
        return [*layout, f"index.json: {e} (servers, `store list` and changes refuse it)"]
    problems, whole = layout, {}
    for name in names:
        try:
            blob = contents.blob(name)
        except (BundleNotFound, FileNotFoundError):  # deleted since it was listed (a purge: then the index changed)
            continue
        except OSError as e:  # a folder, say, where the blob should be: damage to report, not a crash of the check
            problems.append(f"blob {name[:12]} cannot be read: {type(e).__name__}: {e.strerror or e}")
            continue
        if bytes_digest(blob) != name:
            problems.append(f"blob {name[:12]} does not hash to its name")
            continue
        whole[name] = None  # whole: not "missing or damaged", whatever its manifest says
        try:
            manifest = read_manifest(blob)  # accepted once, so it parses; unless put here by hand
            whole[name] = (manifest.task, manifest.version)
        except ClipbankError as e:
            problems.append(f"blob {name[:12]}: {e}")
    problems += _field_problems(index["tasks"]) + _index_problems(typed.tasks, set(whole))
    return problems + typed.record_problems(whole)


def _field_problems(tasks: dict[str, Any]) -> list[str]:
    """Lists of ids or names that are not lists of strings: the parser reads them as empty, so a purge could
    delete a blob that a version still uses."""
    problems = []
    for task, entry in tasks.items():
        for v in entry["versions"]:
            for key, read_as in LIST_FIELDS.items():
                value = v.get(key)
                if value is not None and not (isinstance(value, list) and all(isinstance(x, str) for x in value)):
                    problems.append(
                        f"task {shown(task)} version {v['version']}: {key!r} is {shown(value, 20)}, not a list of "
                        f"strings (read as {read_as})"
                    )
    return problems


def _index_problems(tasks: Mapping[str, TaskRecord], whole: set[str]) -> list[str]:
    """Dangling ids in the index: blobs not in `whole`, active ids no version has, experts no version adds."""
    problems = []
    added = {eid for e in tasks.values() for v in e.versions for eid in v.experts_new}
    lost = {  # experts of a version whose blob is gone: {expert id: that version's name}
        eid: f"task {shown(task)} version {v.version}"
        for task, e in tasks.items()
        for v in e.versions
        if v.bundle_id not in whole
        for eid in v.experts_new
    }
    for task, entry in tasks.items():
        numbers = [v.version for v in entry.versions]
        if len(set(numbers)) != len(numbers):
            problems.append(f"task {shown(task)}: a version number is stored twice: {numbers}")
        for key in ("active", "shadow"):
            named = getattr(entry, key)
            if named and entry.record_of(named) is None:
                problems.append(f"task {shown(task)}: the {key} bundle {named[:12]} is none of its versions")
        for v in entry.versions:
            name = f"task {shown(task)} version {v.version}"
            if v.bundle_id not in whole:
                problems.append(
                    f"{name}: its blob {v.bundle_id[:12]} is missing or damaged (upload its bundle file again "
                    "to write it back)"
                )
            needs = sorted({lost[eid] for eid in v.uses if eid in lost})
            if needs:
                problems.append(f"{name}: cannot be served either, it uses the experts of {', '.join(needs)}")
            missing = [eid[:12] for eid in v.uses if eid not in added]
            if missing:
                problems.append(f"{name}: uses experts no stored version adds: {', '.join(missing[:5])}")
    return problems


def store_leftovers(location: str | os.PathLike) -> dict[str, int]:
    """What a killed writer may leave that is not a problem: temp files, and whole blobs the index does not name."""
    contents = _Contents(location)
    data = contents.index()
    tasks = json.loads(data)["tasks"] if data is not None else {}
    named = {v["bundle_id"] for e in tasks.values() for v in e["versions"]}
    blobs = [n for n in contents.names() if BLOB_NAME.fullmatch(n)]
    return {"temp_files": contents.temp(), "unreferenced_blobs": sum(n not in named for n in blobs)}

"""The local store's own behaviour: crash safety, the lock, index caching, orphan sweeping (the operations
both backends share are in test_store_contract.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from model_store.bank import empty_bank
from model_store.bundle import read_bundle
from model_store.errors import StoreDamaged, StoreError, StoreNotWritable, StoreWriteFailed, TaskNotFound
from model_store.store import LocalStore
from model_store.store_check import check_store, store_leftovers
from model_store.store_index import TaskRecord
from tests.helpers import random_bundle


@pytest.fixture(scope="module")
def bundles(backbone):
    bank = empty_bank(backbone)
    return {v: random_bundle(bank, "cars", seed=10 + v, version=v) for v in (1, 2, 3)}


def test_failed_index_write_leaves_store_as_it_was(tmp_path, bundles, monkeypatch):
    store = LocalStore(tmp_path)
    store.put(bundles[1])
    before = store.index_path.read_bytes()
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("index.json"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreWriteFailed, match="disk full.*nothing was changed"):
        store.put(bundles[2])
    monkeypatch.undo()
    assert store.index_path.read_bytes() == before
    assert store_leftovers(tmp_path) == {"temp_files": 0, "unreferenced_blobs": 0}  # its blob went too: no disk held
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    assert all(not p.name.startswith(".tmp-") for p in store.blobs.iterdir())


@pytest.mark.parametrize("victim", ["blob", "index"])
def test_process_killed_mid_write(tmp_path, bundles, victim):
    """A real process dies (os._exit) in the middle of writing; the next reader sees the old state."""
    store = LocalStore(tmp_path)
    store.put(bundles[1])
    before = store.index()
    (tmp_path / "b2.safetensors").write_bytes(bundles[2])
    script = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        import model_store.store as s
        real = os.fsync
        def dying_fsync(fd):
            # the process dies with part of the new {victim} file on disk
            target = os.readlink(f"/proc/self/fd/{{fd}}")
            in_blobs = os.path.basename(os.path.dirname(target)) == "blobs"
            if ".tmp-" in os.path.basename(target) and in_blobs == ("{victim}" == "blob"):
                os.write(fd, b"partial")
                os._exit(9)
            return real(fd)
        s.os.fsync = dying_fsync
        s.LocalStore(sys.argv[1]).put(Path(sys.argv[1], "b2.safetensors").read_bytes())
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, timeout=120, cwd=os.getcwd()
    )
    assert proc.returncode == 9, proc.stderr.decode()
    after = LocalStore(tmp_path)
    assert after.index() == before
    visible = [p for p in after.blobs.iterdir() if not p.name.startswith(".tmp-")]
    for p in visible:  # a blob is whole or absent: every visible one hashes to its name
        assert hashlib.sha256(p.read_bytes()).hexdigest() + ".safetensors" == p.name
    if victim == "blob":
        assert len(visible) == 1
    r = after.put(bundles[2])  # the next writer cleans up and succeeds
    assert r.version == 2
    assert not [p for p in (*after.blobs.iterdir(), *tmp_path.iterdir()) if p.name.startswith(".tmp-")]
    assert json.loads(after.index_path.read_text())["generation"] == before.generation + 1


def test_concurrent_writers_lose_no_update(tmp_path, backbone):
    """Four processes put four tasks at once; the lock serialises them, so the index keeps all four."""
    bank = empty_bank(backbone)
    for i in range(4):
        (tmp_path / f"b{i}.safetensors").write_bytes(random_bundle(bank, f"task{i}", seed=20 + i))
    root = tmp_path / "store"
    LocalStore(root)
    script = (
        "import sys; from pathlib import Path; from model_store.store import LocalStore; "
        "LocalStore(sys.argv[1]).put(Path(sys.argv[2]).read_bytes())"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(root), str(tmp_path / f"b{i}.safetensors")])
        for i in range(4)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    store = LocalStore(root)
    assert sorted(store.active()) == [f"task{i}" for i in range(4)]
    assert store.generation() == 4


def test_loader_cache_keeps_only_bundles_in_use(tmp_path, backbone, bundles):
    from model_store.loader import BankLoader

    store = LocalStore(tmp_path)
    for v in (1, 2):
        store.put(bundles[v])
    loader = BankLoader(store, backbone)
    for v in (1, 2):
        loader.bundle(store.version("cars", v).bundle_id)
    loader.load()
    assert loader.trim() == 1  # version 1 is stored but not active
    store.deactivate("cars")
    store.purge("cars")
    loader.load()
    assert loader.trim() == 1 and loader._bundles == {}


def test_index_reads_are_cached_until_the_file_changes(tmp_path, monkeypatch):
    from model_store import store as store_module

    store = LocalStore(tmp_path / "s")
    other = LocalStore(tmp_path / "s")  # another process's view of the same folder
    parses = []
    real = store_module.json.loads
    monkeypatch.setattr(store_module.json, "loads", lambda text: parses.append(1) or real(text))
    assert store.generation() == 0 and not parses  # no file yet
    other._change(lambda index: index.with_task("t", lambda record: record))
    parses.clear()
    assert store.generation() == 1 and len(parses) == 1
    assert store.generation() == 1 and store.index().tasks == {"t": TaskRecord()}
    assert len(parses) == 1  # unchanged file: no second parse
    for expected in (2, 3):  # quick successive changes of the same size are still seen
        other._change(lambda index: index)
        assert store.generation() == expected


def test_a_bundle_whose_experts_were_purged_is_refused_and_purge_sweeps_orphan_blobs(tmp_path, backbone):
    from model_store.errors import MissingExpert
    from model_store.loader import BankLoader

    store = LocalStore(tmp_path)
    store.put(random_bundle(empty_bank(backbone), "a", seed=1))
    b = random_bundle(BankLoader(store, backbone).load(), "b", seed=2)  # trained on a's experts
    store.deactivate("a")
    assert store.purge("a") == 1
    with pytest.raises(MissingExpert, match="no stored version adds"):
        store.put(b)  # it could never be served
    assert "b" not in store.index().tasks
    orphan = store.blobs / ("0" * 64 + ".safetensors")  # as a writer killed between blob and index leaves it
    orphan.write_bytes(b"whole but unnamed")
    store.put(random_bundle(empty_bank(backbone), "c", seed=3))
    store.deactivate("c")
    store.purge("c")
    assert not orphan.exists() and list(store.blobs.iterdir()) == []


def test_a_full_or_read_only_disk_refuses_the_change_and_changes_nothing(tmp_path, bundles, monkeypatch):
    """Any OSError of a write (no space, read-only, permissions) is a StoreWriteFailed (503, never a 500)."""
    import errno
    import tempfile

    store = LocalStore(tmp_path)
    store.put(bundles[1])
    store.put(bundles[2], activate=False)
    before = store.index_path.read_bytes()

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".tmp-never-made"))

    monkeypatch.setattr(tempfile, "mkstemp", full)  # no free inodes: the temp file cannot be made
    for change in (lambda: store.put(bundles[3]), lambda: store.activate("cars", 2), lambda: store.deactivate("cars")):
        with pytest.raises(StoreWriteFailed, match="No space left on device") as refused:
            change()
        said = str(refused.value)  # it named the temp file it never made, and `df -h` showed space (an SRE's check)
        assert ".tmp-" not in said and ("index.json" in said or "blobs/" in said) and "df -i" in said, said
        assert "will not help" not in str(refused.value)  # space may be made: only a read-only store says so
        assert not isinstance(refused.value, StoreNotWritable)  # so it is worth sending again (Retry-After)
    monkeypatch.undo()
    assert store.index_path.read_bytes() == before and check_store(tmp_path) == []
    import os  # a full disk shows as a write that fails, naming no file: the message names the one (an outside check)

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StoreWriteFailed, match=r"No space left on device blobs/[0-9a-f]{64}\.safetensors\)"):
        store.put(bundles[3])
    with pytest.raises(StoreWriteFailed, match=r"No space left on device index\.json\)"):
        store.activate("cars", 2)
    monkeypatch.undo()
    assert store.index_path.read_bytes() == before and check_store(tmp_path) == []


def test_a_store_whose_lock_cannot_be_made_refuses_changes_as_write_failures(tmp_path, bundles, monkeypatch):
    """A read-only store (or one with no free inodes) cannot create its lock file: every change, through the lock
    alone too (the server takes it around its own checks), is a StoreWriteFailed, and reads still work."""
    import errno

    import filelock

    store = LocalStore(tmp_path)
    first = store.put(bundles[1]).bundle_id

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(filelock.BaseFileLock, "acquire", read_only)
    for change in (lambda: store.put(bundles[2]), lambda: store.deactivate("cars"), lambda: store.locked().__enter__()):
        with pytest.raises(StoreNotWritable, match="Read-only file system.*nothing was changed.*will not help"):
            change()
    assert store.index().task("cars").active == first


def test_a_change_whose_folder_sync_fails_after_the_rename_is_done(tmp_path, bundles, monkeypatch, caplog):
    """Once the index is renamed into place the change is published: a failing folder fsync is logged, not raised
    (raising made a committed upload answer 500, and its retry 409)."""
    import model_store.files as files_module

    store = LocalStore(tmp_path)

    def eio(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files_module, "_fsync_dir", eio)
    assert store.put(bundles[1]).generation == 1
    assert store.index().task("cars").active and "syncing its folder failed" in caplog.text


def test_store_files_get_the_mode_a_plain_open_would(tmp_path, bundles):
    """Temp files are private to their writer; renamed into a group-shared store they must not stay 0600, or a
    server running as another user could no longer read the index an operator's command wrote."""
    old = os.umask(0o002)
    try:
        store = LocalStore(tmp_path)
        store.put(bundles[1])
    finally:
        os.umask(old)
    assert store.index_path.stat().st_mode & 0o777 == 0o664
    assert {p.stat().st_mode & 0o777 for p in store.blobs.glob("*.safetensors")} == {0o664}


def test_a_lost_index_is_damage_not_an_empty_store(tmp_path, bundles):
    """Blobs without an index: the index was lost. Read as an empty store, generations would restart and the next
    purge would delete every bundle. Reads and writes refuse, `check_store` says so, and nothing is deleted."""
    store = LocalStore(tmp_path)
    store.put(bundles[1])
    store.put(bundles[2])
    store.index_path.unlink()
    for call in (store.index, lambda: store.put(bundles[3]), lambda: store.purge("cars")):
        with pytest.raises(StoreDamaged, match="index.json is missing but its blobs/ folder holds bundles"):
            call()
    assert len(list(store.blobs.glob("*.safetensors"))) == 2
    assert check_store(tmp_path) == ["index.json is missing but blobs/ holds 2 bundles: the index was lost"]


@pytest.mark.parametrize(
    "edit,problem",
    [
        (lambda v: v.update(version="one"), "version entry 0 has no integer version and bundle id"),
        (lambda v: v.update(version=None), "version entry 0 has no integer version and bundle id"),
        (lambda v: v.update(bundle_id="../x"), "version entry 0 names bundle '../x'"),
        (lambda v: v.update(uses="abc"), "'uses' is 'abc', not a list of strings (read as empty)"),
        (lambda v: v.update(classes=7), "'classes' is 7, not a list of strings (read as unknown)"),
    ],
)
def test_check_finds_what_the_servers_parser_refuses_or_misreads(tmp_path, bundles, edit, problem):
    """An outside check: `store check` said "consistent" of an index that servers and `store list` refuse, and
    read a string of ids as its letters."""
    store = LocalStore(tmp_path)
    store.put(bundles[1])
    index = json.loads(store.index_path.read_bytes())
    edit(index["tasks"]["cars"]["versions"][0])
    store.index_path.write_text(json.dumps(index))
    problems = check_store(tmp_path)
    assert len(problems) == 1 and problem in problems[0], problems
    if "servers" in problems[0]:
        with pytest.raises(StoreError, match="malformed"):
            store.index()


def test_an_activate_or_deactivate_that_changes_nothing_writes_no_generation(tmp_path, bundles):
    """Each repeat published a new generation, and every server polling the store built its bank again."""
    store = LocalStore(tmp_path)
    store.put(bundles[1])
    store.put(bundles[2], activate=False)
    before = store.generation()
    assert store.activate("cars", 1) == store.version("cars", 1).bundle_id and store.generation() == before
    store.activate("cars", 2)
    assert store.generation() == before + 1 and store.task("cars").active == store.version("cars", 2).bundle_id
    store.deactivate("cars")
    store.deactivate("cars")
    assert store.generation() == before + 2 and store.task("cars").active is None
    with pytest.raises(TaskNotFound):
        store.deactivate("boats")


def test_the_same_bundle_put_twice_is_named_as_stored_already_not_as_an_old_version(tmp_path, bundles):
    """Two uploads of one file at once both pass the server's own check before either is stored; the second then
    read "already has version 1 ... got 1", as if it were another bundle."""
    from model_store.errors import VersionConflict

    store = LocalStore(tmp_path)
    store.put(bundles[2])
    with pytest.raises(VersionConflict, match="this bundle is stored already: task 'cars' version 2") as active:
        store.put(bundles[2])
    assert "and active; a new bundle needs a higher version" in str(active.value)
    with pytest.raises(VersionConflict, match="already has version 2; a new bundle needs version > 2, got 1") as old:
        store.put(bundles[1])
    assert "an older version cannot be added after a newer one" in str(old.value)
    store.deactivate("cars")  # stored, not active: it says how to use it as it is (an outside check)
    with pytest.raises(VersionConflict, match="`clipbank shadow cars --version 2`"):
        store.put(bundles[2])


def test_a_first_put_killed_after_its_blob_leaves_a_usable_store(tmp_path, bundles, monkeypatch):
    """The index is written before the first blob, so a writer dying between the blob and the index leaves an
    empty store with a leftover blob, not a store that looks like it lost its index."""
    import model_store.store as store_module

    real = store_module.atomic_write
    writes = []

    def die_after_blob(path, data):
        writes.append(path.name)
        real(path, data)
        if path.suffix == ".safetensors":
            raise KeyboardInterrupt  # the process ends here

    monkeypatch.setattr(store_module, "atomic_write", die_after_blob)
    with pytest.raises(KeyboardInterrupt):
        LocalStore(tmp_path).put(bundles[1])
    monkeypatch.undo()
    assert writes[0] == "index.json"
    store = LocalStore(tmp_path)
    assert store.index().generation == 0 and store.put(bundles[1]).generation == 1 and check_store(tmp_path) == []


def test_an_unreadable_blob_or_index_is_a_store_error(tmp_path, bundles):
    """An I/O error other than 'not found' (here a directory where the file should be) is a StoreError, which the
    server reports (the task degrades, or 503), not a raw OSError (a 500, or a failed start)."""
    store = LocalStore(tmp_path)
    bid = store.put(bundles[1]).bundle_id
    blob = store.blobs / f"{bid}.safetensors"
    blob.unlink()
    blob.mkdir()
    with pytest.raises(StoreError, match=f"bundle {bid[:12]} could not be read"):
        store.read(bid)
    store.index_path.rename(tmp_path / "saved")
    store.index_path.mkdir()
    with pytest.raises(StoreError, match="index.json could not be read"):
        store.index()
    assert check_store(tmp_path)[0].startswith("index.json cannot be read")


def _with_expert_at(bundle_bytes: bytes, task: str, eid: str, tower: str, block: int) -> bytes:
    """A bundle for `task` with the experts of `bundle_bytes`, except that expert `eid`'s tensors sit (and are
    routed) at (tower, block) in place of that block's first expert: the same tensors, so the same id, elsewhere."""
    from model_store.bundle import PlacedExpert, pack_bundle

    b = read_bundle(bundle_bytes)
    moved = b.experts[eid]
    routing = b.manifest.to_json()["routing"]
    first = routing[tower][block][0]
    experts = {e: p for e, p in b.experts.items() if e not in (eid, first)}
    experts[eid] = PlacedExpert(tower, block, moved.expert)
    routing[moved.tower][moved.block] = [e for e in routing[moved.tower][moved.block] if e != eid]
    routers = {t: list(r) for t, r in b.routers.items()}
    routers[moved.tower][moved.block] = routers[moved.tower][moved.block][1:]
    routing[tower][block] = [eid, *routing[tower][block][1:]]
    manifest = {k: v for k, v in b.manifest.to_json().items() if k not in ("format", "content_sha256")}
    manifest.update(task=task, routing=routing)
    return pack_bundle(manifest, experts, routers, b.selector_tensors)


def test_the_same_expert_tensors_at_two_places_do_not_stop_a_bank(tmp_path, backbone):
    """Stored bundles may carry one expert id (the same tensors) at two places: a re-issued bundle, or a copy. A
    bank places each expert where its active tasks route it, and an upload that routes it elsewhere is refused."""
    from model_store.bank import build_bank, routed_places
    from model_store.errors import MissingExpert
    from model_store.loader import BankLoader

    c_bytes = random_bundle(empty_bank(backbone), "c", seed=1)
    c = read_bundle(c_bytes)
    x = next(e for e, p in c.experts.items() if (p.tower, p.block) == ("visual", 3))
    p_bytes = _with_expert_at(c_bytes, "p", x, "visual", 0)
    p = read_bundle(p_bytes)
    assert (p.experts[x].tower, p.experts[x].block) == ("visual", 0)
    # such a provider used to decide the expert's place, and the server could not start (task c's routing broke)
    d = read_bundle(random_bundle(empty_bank(backbone), "d", seed=2))
    assert build_bank(backbone, [c, d], providers=[p]).expert_ids[x][:2] == ("visual", 3)
    with pytest.raises(MissingExpert, match=f"routes expert {x[:12]} at visual.0, but another active task"):
        routed_places([c, p])
    store = LocalStore(tmp_path / "store")
    store.put(c_bytes)
    loader = BankLoader(store, backbone)
    with pytest.raises(MissingExpert, match=f"routes expert {x[:12]} at visual.0"):  # an upload: refused
        loader.load(overrides={"p": p})
    store.put(p_bytes)  # already stored (a store written before the check): left out, the rest serves
    bank = loader.load()
    assert bank.task_names == ("c",) and "routes expert" in bank.degraded["p"]


def test_a_purge_and_the_check_leave_an_operators_own_files_in_blobs_alone(tmp_path, bundles):
    """An outside check kept `blobs/cars-backup.safetensors`: a purge deleted it ("1 blob(s) deleted") and the
    check called it a blob that does not hash to its name."""
    store = LocalStore(tmp_path)
    store.put(bundles[1])
    backup = store.blobs / "cars-backup.safetensors"
    backup.write_bytes(bundles[1])
    assert check_store(tmp_path) == [] and store_leftovers(tmp_path)["unreferenced_blobs"] == 0
    store.deactivate("cars")
    assert store.purge("cars") == 1
    assert backup.read_bytes() == bundles[1] and not [p for p in store.blobs.iterdir() if p != backup]


def test_a_purge_counts_only_the_blobs_it_deleted(tmp_path, bundles, monkeypatch, caplog):
    """On a read-only blobs/ a purge answered `purged_blobs: 1` with the blob still on disk (an outside check)."""
    store = LocalStore(tmp_path)
    store.put(bundles[1])
    store.deactivate("cars")
    real = Path.unlink

    def refused(path, missing_ok=False):
        if path.parent == store.blobs:
            raise PermissionError(13, "Read-only file system")
        real(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refused)
    assert store.purge("cars") == 0
    assert "cars" not in store.index().tasks and len(list(store.blobs.glob("*.safetensors"))) == 1
    assert "deleting its blobs failed" in caplog.text
    store.put(bundles[1])  # a blob already missing is not counted either
    (store.blobs / f"{store.active()['cars']}.safetensors").rename(tmp_path / "elsewhere")
    store.deactivate("cars")
    monkeypatch.setattr(Path, "unlink", real)
    assert store.purge("cars") == 0


def test_the_check_finds_an_index_record_its_blob_contradicts(tmp_path, bundles):
    """A hand edit of a version number: `clipbank tasks` listed v7 while every answer said v1."""
    store = LocalStore(tmp_path)
    store.put(bundles[1])
    index = json.loads(store.index_path.read_text())
    index["tasks"]["cars"]["versions"][0]["version"] = 7
    store.index_path.write_text(json.dumps(index))
    (problem,) = check_store(tmp_path)
    assert "task 'cars' version 7: its blob" in problem and "is 'cars' version 1 (index.json was edited?)" in problem


def test_a_store_folder_that_cannot_be_made_or_written_says_where(tmp_path, bundles):
    with pytest.raises(StoreError, match="its folder could not be made"):
        LocalStore("/proc/clipbank-no-such-store")  # not a traceback at the server's start
    with pytest.raises(StoreError, match="its folder could not be used"):  # there, another user's (an outside check)
        LocalStore("/proc/self")
    store = LocalStore(tmp_path)
    store.put(bundles[1])
    (store.blobs / f"{read_bundle(bundles[2]).id}.safetensors").mkdir()  # where its blob goes: named
    with pytest.raises(StoreWriteFailed, match=r"IsADirectoryError: Is a directory blobs/[0-9a-f]{64}\.safetensors"):
        store.put(bundles[2])


def test_the_check_names_a_refused_manifest_once_not_as_a_missing_blob(tmp_path, bundles):
    """A whole blob whose manifest this release refuses was also called "missing or damaged (upload its bundle
    file again)", advice an upload then refuses."""
    from model_store.digest import bytes_digest
    from tests.helpers import edit_bundle

    store = LocalStore(tmp_path)
    legacy = edit_bundle(bundles[1], manifest=lambda m: m.update(templates=["a {:>9}"]))
    bundle_id = bytes_digest(legacy)
    (store.blobs / f"{bundle_id}.safetensors").write_bytes(legacy)
    entry = {"version": 1, "bundle_id": bundle_id, "experts_new": [], "uses": [], "bytes": len(legacy)}
    store.index_path.write_text(
        json.dumps({"generation": 1, "tasks": {"cars": {"active": bundle_id, "versions": [entry]}}})
    )
    (problem,) = check_store(tmp_path)
    assert problem.startswith(f"blob {bundle_id[:12]}: ") and "template" in problem


def test_a_long_reason_a_task_is_left_out_keeps_its_end():
    """An upgrade check's: reasons were cut at 300 characters, and the end that says what to do was lost."""
    from model_store.errors import BackboneMismatch
    from model_store.loader import WHY_CHARS, _why

    short = BackboneMismatch("the bundle's backbone computes otherwise: retrain it")
    assert _why(short) == "backbone_mismatch: the bundle's backbone computes otherwise: retrain it"
    long = BackboneMismatch("x" * 1000 + " (retrain it on this backbone)")
    said = _why(long)
    assert said.startswith("backbone_mismatch: xxx") and said.endswith("(retrain it on this backbone)")
    assert " … " in said and len(said) <= WHY_CHARS + len("backbone_mismatch: ")


def test_an_index_fault_is_logged_once_until_it_changes(caplog):
    """Every poll and change read the corrupt index again: 16 ERROR lines in 25 s (an outside check)."""
    from model_store.errors import StoreError
    from model_store.store import encode_index, parse_index
    from model_store.store_index import StoreIndex

    for data in (b"{garbage", b"{garbage", b"{garbage", encode_index(StoreIndex()), b"{garbage"):
        try:
            parse_index(data, "/s")
        except StoreError:
            pass
    assert [r.levelname for r in caplog.records if "/s" in r.getMessage()] == ["ERROR", "ERROR"]


def test_a_class_name_no_request_could_send_is_refused_new_but_served_stored(tmp_path, backbone, monkeypatch):
    """A security check's: a bundle's classes with NUL or an escape were answered to every client, which got 422
    sending them back. New bundles are refused; the review's: one stored before the rule must keep serving (the
    rule in the manifest check made such a task degraded after an upgrade)."""
    from model_store import store_base
    from model_store.errors import BundleInvalid
    from model_store.labels import labels_problems
    from model_store.loader import BankLoader
    from model_store.store import LocalStore

    store = LocalStore(tmp_path / "store")
    odd = random_bundle(empty_bank(backbone), "cars", seed=1, classes=("red", "gr\x00een", "blue"))
    with pytest.raises(BundleInvalid, match=r"classes\[1\] 'gr\\x00een' has a control character \(U\+0000\)"):
        store.put(odd)
    assert store.active() == {}
    assert labels_problems(["red", "red\x1b[31m"], ["a photo of a {}."]) == [
        "classes[1] 'red\\x1b[31m' has a control character (U+001B): a class name must be one a request could send "
        "as a label"
    ]
    monkeypatch.setattr(store_base, "unanswerable_class", lambda classes: None)  # stored by an earlier release
    store.put(odd)
    bank = BankLoader(LocalStore(tmp_path / "store"), backbone).load()
    assert [t.name for t in bank.tasks] == ["cars"] and not bank.degraded


def test_a_folder_named_like_a_temp_file_does_not_stop_changes(tmp_path, bundles):
    """An outside check: `mkdir blobs/.tmp-x` made every change fail (IsADirectoryError), while `store check` said
    the store was consistent and that the next change would remove it."""
    store = LocalStore(tmp_path)
    store.put(bundles[1])
    (tmp_path / "blobs" / ".tmp-x").mkdir()
    (tmp_path / ".tmp-y").mkdir()
    (tmp_path / ".tmp-left").write_bytes(b"half a file")  # what a killed writer leaves: still removed
    assert store_leftovers(tmp_path)["temp_files"] == 1
    store.put(bundles[2])
    assert store.task("cars").active == store.version("cars", 2).bundle_id
    assert not (tmp_path / ".tmp-left").exists() and (tmp_path / ".tmp-y").is_dir()
    assert store_leftovers(tmp_path)["temp_files"] == 0


def test_the_check_reports_a_folder_where_a_blob_should_be_and_goes_on(tmp_path, bundles):
    """A security check: `clipbank store check` stopped with a bare "Errno 21" (exit 2) on a blob that is a
    folder, instead of reporting the damage (exit 1) with the rest of the store's problems."""
    store = LocalStore(tmp_path)
    store.put(bundles[1])
    blob = store.blobs / f"{read_bundle(bundles[1]).id}.safetensors"
    blob.unlink()
    blob.mkdir()
    cut = read_bundle(bundles[1]).id[:12]
    assert check_store(tmp_path) == [
        f"blob {cut} cannot be read: IsADirectoryError: Is a directory",
        f"task 'cars' version 1: its blob {cut} is missing or damaged (upload its bundle file again to write it back)",
    ]


def test_a_pipe_where_a_blob_or_the_index_should_be_is_reported_not_waited_on(tmp_path, bundles):
    """An outside check: a FIFO in a blob's or the index's place hung `store check`, `store list` and a server's
    start for ever (open waits for a writer)."""
    store = LocalStore(tmp_path)
    bid = store.put(bundles[1]).bundle_id
    blob = store.blobs / f"{bid}.safetensors"
    blob.unlink()
    os.mkfifo(blob)
    with pytest.raises(StoreError, match=f"bundle {bid[:12]} could not be read .*not a regular file"):
        store.read(bid)
    assert (
        check_store(tmp_path)[0]
        == f"blob {bid[:12]} cannot be read: OSError: not a regular file (a pipe, a socket or a device)"
    )
    store.index_path.unlink()
    os.mkfifo(store.index_path)
    with pytest.raises(StoreError, match="index.json could not be read .*not a regular file"):
        LocalStore(tmp_path).index()
    assert check_store(tmp_path) == [
        "index.json cannot be read: OSError: not a regular file (a pipe, a socket or a device)"
    ]


def test_a_lock_file_that_cannot_be_made_on_a_full_file_system_says_where_to_look(tmp_path, bundles, monkeypatch):
    """Out of inodes, `df -h` shows space free: the message says to look at `df -i` too (a reviewer's catch: the
    lock's own error had no such hint)."""
    import errno

    store = LocalStore(tmp_path)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".lock"))

    monkeypatch.setattr(store._lock, "acquire", full)
    with pytest.raises(StoreWriteFailed, match=r"could not be locked .*No space left on device: \.lock\) \(.*`df -i`"):
        store.put(bundles[1])


def test_a_folder_in_the_locks_or_a_blobs_place_is_named(tmp_path, bundles):
    """`.lock` made a folder: every change failed naming no file, and the check said the store was consistent. A
    folder named like a blob failed every clean-up, after its temp files were deleted, saying nothing changed."""
    store = LocalStore(tmp_path)
    store.put(bundles[1])
    (tmp_path / ".lock").unlink(missing_ok=True)
    (tmp_path / ".lock").mkdir()
    with pytest.raises(StoreWriteFailed, match=r"could not be locked .*Is a directory: \.lock"):
        LocalStore(tmp_path).put(bundles[2])
    assert check_store(tmp_path) == [
        ".lock is not a file: every change fails to lock the store (remove it; no process holds it)"
    ]
    (tmp_path / ".lock").rmdir()
    (store.blobs / f"{'a' * 64}.safetensors").mkdir()
    (tmp_path / ".tmp-left").write_bytes(b"half a file")
    assert LocalStore(tmp_path).sweep() == {"temp_files": 1, "unreferenced_blobs": 0}
    assert (store.blobs / f"{'a' * 64}.safetensors").is_dir()  # an operator's folder: left alone


def test_the_folders_own_files_are_checked_before_its_index_is(tmp_path):
    """A fresh store (no index yet) with a `.lock` folder was "consistent", and every change failed."""
    (tmp_path / "blobs").mkdir(parents=True)
    (tmp_path / ".lock").mkdir()
    assert check_store(tmp_path) == [
        ".lock is not a file: every change fails to lock the store (remove it; no process holds it)"
    ]
    (tmp_path / "index.json").write_text("{not json")
    assert len(check_store(tmp_path)) == 2


def test_a_store_at_its_last_generation_refuses_a_change_it_could_not_read_back(tmp_path, bundles):
    """The review: an index at 2^53-1 was written one on, and then refused as malformed at its next read."""
    from model_store.store_index import MAX_GENERATION

    store = LocalStore(tmp_path)
    store.put(bundles[1])
    index = json.loads(store.index_path.read_text())
    store.index_path.write_text(json.dumps({**index, "generation": MAX_GENERATION}))
    before = store.index_path.read_bytes()
    with pytest.raises(StoreError, match="at its last generation"):
        store.put(bundles[2])
    assert store.index_path.read_bytes() == before and store.index().generation == MAX_GENERATION


def test_a_version_given_as_text_is_a_type_error_that_says_so(tmp_path, backbone):
    """A notebook's `store.activate("tex", "1")`: "task 'tex' has no version '1'; stored versions: 1"."""
    from model_store.bank import empty_bank
    from tests.helpers import random_bundle

    store = LocalStore(tmp_path / "store")
    store.put(random_bundle(empty_bank(backbone), "tex", seed=1))
    with pytest.raises(TypeError, match="a version is a whole number, got str '1'"):
        store.activate("tex", "1")
    assert store.index().version("tex", 1).version == 1

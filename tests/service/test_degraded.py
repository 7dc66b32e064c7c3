"""Degraded start: a damaged, missing or refused bundle disables only its task; the rest of the bank serves."""

from __future__ import annotations

import json

import anyio
import pytest

from model_store.bank import build_bank, empty_bank
from model_store.bundle import read_bundle
from model_store.digest import bytes_digest
from model_store.errors import StoreError
from model_store.store import LocalStore
from tests.helpers import edit_bundle, random_bundle, with_version
from tests.service.conftest import AUTH, running_app
from tests.service.images import colour

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def two_tasks(backbone):
    """Bytes of task a (v1), task b v1 and v2 (b routes to a's experts too), and c (on its own)."""
    a = random_bundle(empty_bank(backbone), "a", seed=31)
    with_a = build_bank(backbone, [read_bundle(a)])
    b1 = random_bundle(with_a, "b", seed=32)
    return {"a": a, "b1": b1, "b2": with_version(b1, 2), "c": random_bundle(empty_bank(backbone), "c", seed=33)}


def _store(tmp_path, *bundles: bytes) -> LocalStore:
    store = LocalStore(tmp_path / "store")
    for data in bundles:
        store.put(data)
    return store


def _flip_byte(store: LocalStore, data: bytes) -> None:
    path = store.blobs / f"{bytes_digest(data)}.safetensors"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


async def _pinned(c, task: str) -> int:
    r = await c.post("/classify", files=[("images", ("r.png", colour("red")))], data={"task": task})
    return r.status_code


async def test_a_damaged_blob_disables_only_its_task_and_rollback_recovers(tmp_path, backbone, two_tasks):
    store = _store(tmp_path, two_tasks["a"], two_tasks["b1"], two_tasks["b2"], two_tasks["c"])
    _flip_byte(store, two_tasks["b2"])
    async with running_app(tmp_path, backbone) as c:
        health = (await c.get("/healthz")).json()
        assert health["status"] == "degraded" and list(health["degraded"]) == ["b"]
        assert "store_damaged" in health["degraded"]["b"] and "does not hash to its name" in health["degraded"]["b"]
        ready = await c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert sorted(ready.json()["tasks"]) == ["a", "c"]
        assert await _pinned(c, "a") == 200 and await _pinned(c, "c") == 200
        r = await c.post("/classify", files=[("images", ("r.png", colour("red")))], data={"task": "b"})
        assert r.status_code == 503 and "Retry-After" not in r.headers
        assert r.json()["error"]["code"] == "task_degraded"
        assert "task 'b' is active but cannot be served: store_damaged" in r.json()["error"]["message"]
        listed = {t["task"]: t for t in (await c.get("/tasks", headers=AUTH)).json()["tasks"]}
        assert listed["b"]["degraded"] and not listed["b"]["serving"] and listed["b"]["active_version"] == 2
        assert listed["a"]["degraded"] is None and listed["a"]["serving"]
        assert "clipbank_degraded_tasks 1.0" in (await c.get("/metrics")).text
        r = await c.post("/tasks/b/activate", json={"version": 1}, headers=AUTH)  # roll back to the intact version
        assert r.status_code == 200, r.text
        assert r.json()["serving"] and r.json()["degraded"] is None
        health = (await c.get("/healthz")).json()
        assert (health["status"], health["degraded"], health["store_error"]) == ("live", {}, None)
        assert await _pinned(c, "b") == 200
        assert "clipbank_degraded_tasks 0.0" in (await c.get("/metrics")).text


async def test_a_broken_provider_disables_the_tasks_that_use_its_experts(tmp_path, backbone, two_tasks):
    store = _store(tmp_path, two_tasks["a"], two_tasks["b1"], two_tasks["c"])
    (store.blobs / f"{bytes_digest(two_tasks['a'])}.safetensors").unlink()
    async with running_app(tmp_path, backbone) as c:
        health = (await c.get("/healthz")).json()
        assert sorted(health["degraded"]) == ["a", "b"]  # b routes to a's experts, and says so
        assert "it uses the experts of task 'a' version 1 (bundle" in health["degraded"]["b"]
        assert "is missing from the store" in health["degraded"]["b"]
        assert "upload its bundle file again" in health["degraded"]["a"]  # what repairs it (an outside check)
        assert await _pinned(c, "c") == 200
        r = await c.delete("/tasks/b", headers=AUTH)
        assert r.status_code == 200, r.text
        r = await c.delete("/tasks/a", params={"purge": "true"}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert (await c.get("/healthz")).json()["status"] == "live"


async def test_uploading_a_damaged_versions_own_bundle_again_writes_its_blob_back(tmp_path, backbone, two_tasks):
    """The repair with the bundle file at hand: its bytes hash to the id the index names, so they are that version.
    Every task its experts disabled serves again; nothing else changes, and a whole blob is a 409."""
    store = _store(tmp_path, two_tasks["a"], two_tasks["b1"], two_tasks["c"])
    store.deactivate("c")
    _flip_byte(store, two_tasks["a"])
    before = store.index()
    async with running_app(tmp_path, backbone) as c:
        assert sorted((await c.get("/healthz")).json()["degraded"]) == ["a", "b"]
        files = {"bundle": ("a.safetensors", two_tasks["a"], "application/octet-stream")}
        r = await c.post("/tasks", files=files, params={"mode": "inactive"}, headers=AUTH)
        assert r.status_code == 200 and r.json()["restored"], r.text
        assert r.json()["state"] == "active"  # a restored version keeps its state, whatever the mode asked
        assert r.json()["generation"] == before.generation + 1 and r.json()["version"] == 1
        health = (await c.get("/healthz")).json()
        assert (health["status"], health["degraded"]) == ("live", {})
        assert await _pinned(c, "a") == 200 and await _pinned(c, "b") == 200
        r = await c.post("/tasks", files=files, headers=AUTH)
        assert r.status_code == 409 and r.json()["error"]["code"] == "version_conflict"
        assert "stored already, whole" in r.json()["error"]["message"]
        files = {"bundle": ("c.safetensors", two_tasks["c"], "application/octet-stream")}
        r = await c.post("/tasks", files=files, headers=AUTH)  # whole and inactive: stays inactive
        assert r.status_code == 409 and (await c.get("/tasks/c", headers=AUTH)).json()["active_version"] is None
    after = LocalStore(tmp_path / "store")
    assert after.read(bytes_digest(two_tasks["a"])) == two_tasks["a"]
    assert after.index().tasks == before.tasks  # the versions and their states as they were


async def test_a_blob_put_back_by_hand_serves_again_without_a_restart(tmp_path, backbone, two_tasks, monkeypatch):
    """An outside check moved a blob away and back: its task stayed degraded until a restart (polls rebuild only
    on a new generation), and re-uploading the same file answered 409 "stored already, whole"."""
    from service import degraded

    monkeypatch.setattr(degraded, "FIRST_RETRY_SECONDS", 0.2)
    monkeypatch.setattr(degraded, "LAST_RETRY_SECONDS", 0.4)
    store = _store(tmp_path, two_tasks["a"], two_tasks["c"])
    path = store.blobs / f"{bytes_digest(two_tasks['a'])}.safetensors"
    path.rename(tmp_path / "away")
    async with running_app(tmp_path, backbone, poll_seconds=0.1) as c:
        assert list((await c.get("/healthz")).json()["degraded"]) == ["a"]
        await anyio.sleep(0.5)  # tried again meanwhile: still missing, still degraded, still serving c
        assert list((await c.get("/healthz")).json()["degraded"]) == ["a"] and await _pinned(c, "c") == 200
        (tmp_path / "away").rename(path)
        with anyio.fail_after(10):  # nothing done but putting it back: the next polls try it again
            while (await c.get("/healthz")).json()["degraded"]:
                await anyio.sleep(0.1)
        assert await _pinned(c, "a") == 200


async def test_uploading_a_blob_put_back_by_hand_serves_its_task_at_once(tmp_path, backbone, two_tasks):
    store = _store(tmp_path, two_tasks["a"], two_tasks["c"])
    path = store.blobs / f"{bytes_digest(two_tasks['a'])}.safetensors"
    path.rename(tmp_path / "away")
    async with running_app(tmp_path, backbone) as c:
        assert list((await c.get("/healthz")).json()["degraded"]) == ["a"]
        (tmp_path / "away").rename(path)
        files = {"bundle": ("a.safetensors", two_tasks["a"], "application/octet-stream")}
        r = await c.post("/tasks", files=files, headers=AUTH)  # the repair the docs give: it serves at once
        assert r.status_code == 200 and r.json()["restored"], r.text
        assert (await c.get("/healthz")).json()["degraded"] == {} and await _pinned(c, "a") == 200
        r = await c.post("/tasks", files=files, headers=AUTH)
        assert r.status_code == 409 and "stored already, whole" in r.text  # not degraded: nothing to repair


async def test_a_manifest_this_release_refuses_disables_its_task(tmp_path, backbone, two_tasks):
    """A blob stored by an older release under weaker checks (here: a template with a format spec)."""
    store = _store(tmp_path, two_tasks["c"])
    legacy = edit_bundle(two_tasks["a"], manifest=lambda m: m.update(templates=["a {:>9}"]))
    bundle_id = bytes_digest(legacy)
    (store.blobs / f"{bundle_id}.safetensors").write_bytes(legacy)
    index = json.loads(store.index_path.read_text())
    entry = {"version": 1, "bundle_id": bundle_id, "experts_new": [], "uses": [], "bytes": len(legacy)}
    index["tasks"]["a"] = {"active": bundle_id, "versions": [entry]}
    store.index_path.write_text(json.dumps(index))
    async with running_app(tmp_path, backbone) as c:
        degraded = (await c.get("/healthz")).json()["degraded"]
        assert list(degraded) == ["a"] and "bundle_invalid" in degraded["a"]
        assert await _pinned(c, "c") == 200
        assert (await c.delete("/tasks/a", params={"purge": "true"}, headers=AUTH)).status_code == 200
        assert (await c.get("/healthz")).json()["degraded"] == {}


async def test_a_corrupt_index_still_serves_zero_shot_and_refuses_writes(tmp_path, backbone, two_tasks):
    store = _store(tmp_path, two_tasks["c"])
    store.index_path.write_text('{"generation": 3, "tasks": {')
    async with running_app(tmp_path, backbone) as c:
        health = (await c.get("/healthz")).json()
        assert health["status"] == "degraded" and "index is corrupt" in health["store_error"]
        assert str(tmp_path) not in health["store_error"]  # no server paths to clients
        r = await c.post("/classify", files=[("images", ("r.png", colour("red")))], data={"labels": ["red", "blue"]})
        assert r.status_code == 200 and r.json()["results"][0]["labels"][0]["label"] == "red"
        r = await c.post("/tasks", files={"bundle": ("a", two_tasks["a"])}, headers=AUTH)
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_error" and r.headers["Retry-After"]
        assert store.index_path.read_text() == '{"generation": 3, "tasks": {'  # nothing overwritten
        # not ready: a balancer sent such a server (a replica started while its store was down) its share of task
        # traffic, all of it answered by zero-shot CLIP
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_error" and r.headers["Retry-After"]
        assert "has not read its store since it started" in r.json()["error"]["message"]
        assert "index is corrupt" in r.json()["error"]["message"] and str(tmp_path) not in r.text
        assert "clipbank_ready 0.0" in (await c.get("/metrics")).text
        good = _store(tmp_path / "good", two_tasks["c"])
        store.index_path.write_bytes(good.index_path.read_bytes())  # the index restored: ready at the next poll
        assert c.app.state.service.registry.refresh()
        r = await c.get("/readyz")
        assert r.status_code == 200 and r.json()["tasks"] == ["c"], r.text
        assert "clipbank_ready 1.0" in (await c.get("/metrics")).text


async def test_a_bundle_for_another_backbone_is_degraded_not_fatal(tmp_path, backbone, two_tasks):
    store = _store(tmp_path, two_tasks["c"])
    other = edit_bundle(two_tasks["a"], manifest=lambda m: m["backbone"].update(fingerprint="0" * 64))
    store.put(other)  # the store does not know the backbone; the server does
    async with running_app(tmp_path, backbone) as c:
        degraded = (await c.get("/healthz")).json()["degraded"]
        assert list(degraded) == ["a"] and "backbone_mismatch" in degraded["a"]
        assert await _pinned(c, "c") == 200
        # the store holds two backbones already: its served tasks' new versions are not refused for it (the review)
        r = await c.post("/tasks", files={"bundle": ("c2", with_version(two_tasks["c"], 2))}, headers=AUTH)
        assert r.status_code == 201, r.text


async def test_a_first_task_of_this_backbone_beside_another_backbones_is_refused(tmp_path, backbone, two_tasks):
    """An outside check's push of this server's backbone into a store whose tasks were all another backbone's
    landed (201), and every server of it was degraded since; activating a version stored inactive did too."""
    store = _store(tmp_path)
    store.put(edit_bundle(two_tasks["a"], manifest=lambda m: m["backbone"].update(fingerprint="0" * 64)))
    d = random_bundle(empty_bank(backbone), "d", seed=34)
    async with running_app(tmp_path, backbone) as c:
        generation = store.index().generation
        for mode in ("active", "shadow"):
            r = await c.post(f"/tasks?mode={mode}", files={"bundle": ("d", d)}, headers=AUTH)
            assert r.status_code == 422 and r.json()["error"]["code"] == "backbone_mismatch", r.text
            assert "active tasks 'a' were trained on another backbone" in r.json()["error"]["message"]
        assert store.index().generation == generation and "d" not in store.index().tasks
        r = await c.post("/tasks?mode=inactive", files={"bundle": ("d", d)}, headers=AUTH)  # stored, not served
        assert r.status_code == 201, r.text
        for change in ("activate", "shadow"):
            r = await c.post(f"/tasks/d/{change}", json={"version": 1}, headers=AUTH)
            assert r.status_code == 422 and r.json()["error"]["code"] == "backbone_mismatch", r.text
        assert (await c.delete("/tasks/a", headers=AUTH)).status_code == 200  # the way to move the store over
        assert (await c.post("/tasks/d/activate", json={"version": 1}, headers=AUTH)).status_code == 200


async def test_unreadable_store_files_degrade_instead_of_failing(tmp_path, backbone, two_tasks):
    """I/O errors other than 'not found' (a directory where a file should be stands in for EIO or EACCES): an
    unreadable blob disables its task, an unreadable index serves zero-shot; neither stops the server."""
    store = _store(tmp_path, two_tasks["a"], two_tasks["c"])
    blob = store.blobs / f"{bytes_digest(two_tasks['c'])}.safetensors"
    blob.unlink()
    blob.mkdir()
    async with running_app(tmp_path, backbone) as c:
        health = (await c.get("/healthz")).json()
        assert list(health["degraded"]) == ["c"] and "could not be read" in health["degraded"]["c"]
        assert await _pinned(c, "a") == 200
    blob.rmdir()
    store.index_path.rename(tmp_path / "index.saved")
    store.index_path.mkdir()
    async with running_app(tmp_path, backbone) as c:
        health = (await c.get("/healthz")).json()
        assert health["status"] == "degraded" and "index.json could not be read" in health["store_error"]
        r = await c.post("/classify", files=[("images", ("r.png", colour("red")))], data={"labels": ["red", "blue"]})
        assert r.status_code == 200
        assert (await c.get("/tasks", headers=AUTH)).status_code == 503


async def test_a_lost_index_refuses_writes_and_deletes_nothing(tmp_path, backbone, two_tasks):
    store = _store(tmp_path, two_tasks["a"], two_tasks["c"])
    store.index_path.unlink()
    async with running_app(tmp_path, backbone) as c:
        health = (await c.get("/healthz")).json()
        assert health["status"] == "degraded" and "index.json is missing" in health["store_error"]
        r = await c.post("/tasks", files={"bundle": ("b", two_tasks["b1"])}, headers=AUTH)
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_damaged", r.text
        assert "Retry-After" not in r.headers  # retrying cannot help: an operator must restore the index
        r = await c.delete("/tasks/a", params={"purge": "true"}, headers=AUTH)
        assert r.status_code == 503
    assert len(list(store.blobs.glob("*.safetensors"))) == 2


async def test_a_full_disk_is_a_clear_503_and_changes_nothing(tmp_path, backbone, two_tasks, monkeypatch):
    import errno
    import tempfile

    store = _store(tmp_path, two_tasks["a"])
    async with running_app(tmp_path, backbone) as c:

        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(tempfile, "mkstemp", full)
        r = await c.post("/tasks", files={"bundle": ("c", two_tasks["c"])}, headers=AUTH)
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_write_failed", r.text
        assert "No space left on device" in r.json()["error"]["message"] and r.headers["Retry-After"] == "30"
        r = await c.post("/tasks/a/activate", json={"version": 1}, headers=AUTH)
        assert r.status_code in (200, 503), r.text  # already active: nothing to write, or refused
        monkeypatch.undo()
        assert (await c.post("/tasks", files={"bundle": ("c", two_tasks["c"])}, headers=AUTH)).status_code == 201
    assert store.index().generation == 2


async def test_a_read_only_store_serves_says_so_and_refuses_changes_without_a_retry(
    tmp_path, backbone, two_tasks, monkeypatch
):
    """A store folder this server cannot write: /healthz says so (still `live`: it serves all it has), and a change
    is 503 `store_not_writable` with no Retry-After (sending it again cannot help; it said `Retry-After: 30` before,
    beside a message saying no retry would), where a full disk is `store_write_failed`, worth a retry."""
    import errno
    import os
    import tempfile

    store = _store(tmp_path, two_tasks["a"])
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if path == store.root else access(path, mode))
    async with running_app(tmp_path, backbone) as c:
        health = (await c.get("/healthz")).json()
        assert health["status"] == "live" and health["store_writable"] is False, health
        assert "clipbank_store_read_only 1.0" in (await c.get("/metrics")).text  # something to alert on

        def read_only(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(tempfile, "mkstemp", read_only)
        r = await c.post("/tasks", files={"bundle": ("c", two_tasks["c"])}, headers=AUTH)
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_not_writable", r.text
        assert "Retry-After" not in r.headers and "will not help" in r.json()["error"]["message"]
        assert await _pinned(c, "a") == 200
        monkeypatch.undo()
        assert (await c.get("/healthz")).json()["store_writable"] is True
        assert "clipbank_store_read_only 0.0" in (await c.get("/metrics")).text
        assert (await c.post("/tasks", files={"bundle": ("c", two_tasks["c"])}, headers=AUTH)).status_code == 201
    assert store.index().generation == 2


async def test_health_answers_while_the_bank_is_loading(tmp_path, backbone, two_tasks, monkeypatch):
    """/healthz is 200 `live` from the first request: it once read a registry that had no bank yet (a 500)."""
    from service import lifecycle

    services, seen = [], []
    load_models, load = lifecycle.Service._load_models, lifecycle.Registry.load

    def loading_models(self, *a, **k):
        services.append(self)
        return load_models(self, *a, **k)

    def loading(self, *a, **k):
        seen.append(services[0].health())  # what /healthz would report now, in the middle of the load
        return load(self, *a, **k)

    monkeypatch.setattr(lifecycle.Service, "_load_models", loading_models)
    monkeypatch.setattr(lifecycle.Registry, "load", loading)
    _store(tmp_path, two_tasks["a"])
    async with running_app(tmp_path, backbone) as c:
        assert (await c.get("/healthz")).json()["status"] == "live"
    assert seen == [{"degraded": {}, "store_error": None}]


async def test_a_task_left_out_for_a_passing_store_failure_is_tried_again(tmp_path, backbone, two_tasks, monkeypatch):
    """An object store's 503 while a blob was read left the task out until the next store change (a replica then
    answered 404 for a task every other replica served, X-Min-Generation included)."""
    from model_store.errors import StoreUnavailable

    store = _store(tmp_path, two_tasks["a"], two_tasks["c"])
    failing = {bytes_digest(two_tasks["c"])}
    real = LocalStore.read

    def flaky(self, bundle_id):
        if bundle_id in failing:
            raise StoreUnavailable("the object store could not read blob (SlowDown)")
        return real(self, bundle_id)

    monkeypatch.setattr(LocalStore, "read", flaky)
    async with running_app(tmp_path, backbone, store=str(store.root), poll_seconds=0.1) as c:
        health = (await c.get("/healthz")).json()
        assert list(health["degraded"]) == ["c"] and health["degraded"]["c"].startswith("store_unavailable:")
        failing.clear()  # the store answers again; nothing in it changed
        with anyio.fail_after(10):
            while (await c.get("/healthz")).json()["degraded"]:
                await anyio.sleep(0.1)
        assert await _pinned(c, "c") == 200


async def test_a_purge_of_an_active_task_that_fails_changes_nothing(tmp_path, backbone, two_tasks, monkeypatch):
    """DELETE ?purge=true of an active task is one store write: when it fails, the task still answers (it made
    two before: an outside check's kill between them left the task deactivated and unpurged)."""
    from model_store.errors import StoreWriteFailed

    store = _store(tmp_path, two_tasks["a"], two_tasks["c"])
    async with running_app(tmp_path, backbone) as c:

        def full(self, task, deactivate=False):
            raise StoreWriteFailed("the store could not be written (a purge: No space left); nothing was changed")

        monkeypatch.setattr(LocalStore, "purge", full)
        r = await c.delete("/tasks/a", params={"purge": "true"}, headers=AUTH)
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_write_failed", r.text
        assert "nothing was changed" in r.json()["error"]["message"]
        assert store.index().task("a").active is not None and await _pinned(c, "a") == 200
        monkeypatch.undo()
        assert (await c.delete("/tasks/a", params={"purge": "true"}, headers=AUTH)).status_code == 200
    assert "a" not in store.index().tasks


def test_degraded_tasks_are_retried_only_when_a_retry_can_heal_them_and_ever_less_often(monkeypatch, caplog):
    """A reviewer's: another backbone's task was rebuilt every 30 s for ever, with two log lines each time."""
    from service import degraded

    clock = [1000.0]
    monkeypatch.setattr(degraded.time, "monotonic", lambda: clock[0])
    retry = degraded.DegradedRetry()
    mismatch = {"old": "backbone_mismatch: bundle backbone fingerprint ..."}
    missing = {"a": "bundle_not_found: bundle 4be62ecd4936 is missing from the store"}
    clock[0] += 10_000
    assert not retry.due(mismatch)  # no retry heals another backbone's bundle
    retry.swapped(missing)
    due_at = []
    for _ in range(2000):  # 2000 polls of 2 s
        clock[0] += 2.0
        if retry.due(missing):
            due_at.append(clock[0])
    gaps = [round(b - a) for a, b in zip(due_at, due_at[1:], strict=False)]
    assert due_at[0] - 10_000 - 1000 == 30 and gaps[:5] == [60, 120, 240, 480, 600] and set(gaps[5:]) == {600}
    assert retry.due({"s3": "store_unavailable: the endpoint did not answer"})  # at every poll
    caplog.clear()
    for _ in range(3):
        retry.swapped(missing)  # the same reason again: logged once, when it appeared
    assert "task a is degraded" not in caplog.text
    retry.swapped({})
    assert "task a serves again" in caplog.text


async def test_a_damaged_shadow_says_why_it_is_not_scored_and_is_scored_once_restored(tmp_path, backbone, two_tasks):
    """An outside check's: the shadow's damage was only in the log (GET /tasks/t/shadow said "does not score yet",
    404), and re-uploading its bytes restored the blob but the server never read it again."""
    store = _store(tmp_path, two_tasks["a"], two_tasks["c"])
    store.put(two_tasks["b1"], activate=False)
    store.set_shadow("b", 1)
    _flip_byte(store, two_tasks["b1"])
    async with running_app(tmp_path, backbone) as c:
        r = await c.get("/tasks/b/shadow", headers=AUTH)
        assert r.status_code == 503 and r.json()["error"]["code"] == "task_degraded", r.text
        assert "the version of task 'b' in shadow is not scored: store_damaged" in r.json()["error"]["message"]
        info = (await c.get("/tasks/b", headers=AUTH)).json()
        assert info["shadow_version"] == 1 and "does not hash to its name" in info["shadow_degraded"]
        r = await c.post("/tasks", files={"bundle": ("b.safetensors", two_tasks["b1"])}, headers=AUTH)
        assert r.status_code == 200 and r.json()["restored"], r.text
        r = await c.get("/tasks/b/shadow", headers=AUTH)
        assert r.status_code == 200 and r.json()["version"] == 1, r.text
        assert (await c.get("/tasks/b", headers=AUTH)).json()["shadow_degraded"] is None


async def test_a_shadow_left_out_for_a_passing_store_error_is_read_again(tmp_path, backbone, two_tasks, monkeypatch):
    """A reviewer's: a version in shadow left out for an object store's 503 was read again only at the store's
    next generation (GET /tasks/t/shadow: 503 task_degraded meanwhile), and re-uploading its intact bytes was a
    409 that changed nothing."""
    from model_store.errors import StoreUnavailable

    store = _store(tmp_path, two_tasks["a"])
    store.put(two_tasks["b1"], activate=False)
    store.set_shadow("b", 1)
    shadowed, real, down = bytes_digest(two_tasks["b1"]), LocalStore.read, [True]

    def flaky(self, bundle_id):
        if bundle_id == shadowed and down[0]:
            raise StoreUnavailable("the object store could not read blob (SlowDown)")
        return real(self, bundle_id)

    monkeypatch.setattr(LocalStore, "read", flaky)
    async with running_app(tmp_path, backbone) as c:
        r = await c.get("/tasks/b/shadow", headers=AUTH)
        assert r.status_code == 503 and "store_unavailable" in r.json()["error"]["message"], r.text
        down[0] = False
        assert c.app.state.service.registry.refresh()  # a passing reason: tried again at the next poll
        assert (await c.get("/tasks/b/shadow", headers=AUTH)).status_code == 200
    down[0] = True
    async with running_app(tmp_path, backbone) as c:  # its intact bytes sent again: read again, not a 409
        assert (await c.get("/tasks/b/shadow", headers=AUTH)).status_code == 503
        down[0] = False
        r = await c.post("/tasks", files={"bundle": ("b.safetensors", two_tasks["b1"])}, headers=AUTH)
        assert r.status_code == 200 and r.json()["restored"], r.text
        assert (await c.get("/tasks/b/shadow", headers=AUTH)).status_code == 200


async def test_an_upload_racing_a_purge_of_its_own_bundle_stores_it_anew(tmp_path, backbone, two_tasks, monkeypatch):
    """An upload read the index before a purge of the same task and took the restore path: 404 "nothing to
    restore", the bundle not stored (6 of 30 rounds in an outside check). It is stored as a new upload now."""
    store = _store(tmp_path, two_tasks["a"], two_tasks["c"])
    async with running_app(tmp_path, backbone) as c:
        registry = c.app.state.service.registry
        stale = registry.store.index()  # the upload's read, before the purge lands
        store.deactivate("a")
        store.purge("a")
        reads = iter([stale])
        real = registry.store.index
        monkeypatch.setattr(registry.store, "index", lambda: next(reads, None) or real())
        files = {"bundle": ("a.safetensors", two_tasks["a"], "application/octet-stream")}
        r = await c.post("/tasks", files=files, params={"force": "true"}, headers=AUTH)
        assert r.status_code == 201 and not r.json().get("restored"), r.text
        assert await _pinned(c, "a") == 200


async def test_a_pinned_404_carries_the_generation_of_the_bank_that_refused_it(tmp_path, backbone, two_tasks):
    """The 404 came from the bank its batch ran on, but X-Clipbank-Generation was read as the answer started: a
    push landing in between made it name a generation where the task was active (10% of such 404s in an outside
    check)."""
    _store(tmp_path, two_tasks["c"])
    async with running_app(tmp_path, backbone) as c:
        service = c.app.state.service
        before = service.registry.bank
        files = {"bundle": ("a.safetensors", two_tasks["a"], "application/octet-stream")}
        r = await c.post("/tasks", files=files, params={"force": "true"}, headers=AUTH)
        assert r.status_code == 201 and service.registry.bank.generation > before.generation, r.text
        service.batcher._bank = lambda: before  # the batch took the bank of before the push
        r = await c.post("/classify", files=[("images", ("r.png", colour("red")))], data={"task": "a"})
        assert r.status_code == 404 and r.headers["x-clipbank-generation"] == str(before.generation), r.headers


def _metric_value(text: str, name: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[1])


async def test_metrics_say_ready_store_error_saturation_and_error_codes(tmp_path, backbone, two_tasks):
    """A monitoring check could not alert on a store the server cannot read (no metric changed), on readiness,
    on what max_queue_images bounds, on memory, or on overload apart from what clients cause (every 503 was one
    series)."""
    store = _store(tmp_path, two_tasks["c"])
    async with running_app(tmp_path, backbone) as c:
        text = (await c.get("/metrics")).text
        for line in ("clipbank_ready 1.0", "clipbank_store_error 0.0", "clipbank_admitted_images 0.0"):
            assert line in text, line
        assert "clipbank_max_queue_images 1024.0" in text and "process_resident_memory_bytes" in text
        batched = _metric_value(text, "clipbank_batch_images_count")
        r = await c.post("/classify", files=[("images", ("r.png", colour("red")))], data={"task": "nope"})
        assert r.status_code == 404 and r.headers["x-clipbank-error"] == "task_not_found"
        assert r.headers["x-clipbank-generation"] == str(store.index().generation)
        text = (await c.get("/metrics")).text
        assert 'clipbank_errors_total{code="task_not_found",endpoint="/classify"} 1.0' in text
        # refused before decoding: no pass ran for it (an outside check saw it counted as batch images)
        assert _metric_value(text, "clipbank_batch_images_count") == batched
        store.index_path.write_text("{garbage")
        c.app.state.service.registry.refresh()
        assert "clipbank_store_error 1.0" in (await c.get("/metrics")).text
        # a store that fails after a bank was read from it: that bank serves, so the server stays ready
        assert "clipbank_ready 1.0" in (await c.get("/metrics")).text
        r = await c.get("/readyz")
        assert r.status_code == 200 and r.json()["status"] == "degraded" and r.json()["tasks"] == ["c"], r.text


async def test_a_store_replaced_under_the_server_is_said_without_its_path(tmp_path, backbone, two_tasks):
    """An outside check: a backup of the index restored under a running server showed the store's full path on the
    open /healthz ("the store at /srv/... was replaced")."""
    store = _store(tmp_path, two_tasks["a"])
    backup = store.index_path.read_text()
    store.put(two_tasks["c"])
    async with running_app(tmp_path, backbone) as c:
        store.index_path.write_text(backup)  # an older index of the same store: a restored backup
        c.app.state.service.registry.refresh()
        health = (await c.get("/healthz")).json()
        assert health["status"] == "degraded" and "was replaced under this process" in health["store_error"]
        assert str(tmp_path) not in health["store_error"], health  # no server paths to clients
        r = await c.get("/tasks", headers=AUTH)  # an outside check: GET /tasks said nothing of what still serves
        served = r.json()["error"]["details"]
        assert r.status_code == 503 and [t["task"] for t in served["serving"]] == ["a", "c"], r.text
        assert served["generation"] == 2 and served["serving"][0]["version"] == 1
        registry = c.app.state.service.registry  # any store error naming the store: by its folder's name
        registry._store_failed(StoreError(f"store {store.location}: its index.json could not be read"))
        health = (await c.get("/healthz")).json()
        assert health["store_error"] == "store store: its index.json could not be read", health


async def test_a_store_a_newer_release_wrote_is_served_and_said_read_only_at_start(
    tmp_path, backbone, two_tasks, caplog
):
    """An outside check: such a store served with no word of it; the first push was where the operator learnt it."""
    store = _store(tmp_path, two_tasks["a"])
    store.index_path.write_text(json.dumps({**json.loads(store.index_path.read_text()), "format": 99}))
    with caplog.at_level("WARNING", logger="service.lifecycle"):
        async with running_app(tmp_path, backbone) as c:
            assert await _pinned(c, "a") == 200
            r = await c.delete("/tasks/a", headers=AUTH)
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_too_new"
    said = [r.getMessage() for r in caplog.records if "newer clipbank" in r.getMessage()]
    assert said and "index format 99" in said[0] and "every change is refused" in said[0], said


async def test_the_store_served_is_named_at_start_and_a_new_empty_one_said(tmp_path, backbone, two_tasks, caplog):
    """An outside check's typo in --store served an empty bank, ready, with no line naming the store."""
    with caplog.at_level("INFO", logger="clipbank.service"):
        async with running_app(tmp_path, backbone) as c:  # no store there yet
            assert (await c.get("/readyz")).status_code == 200
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("store ")]
    assert len(said) == 1 and "is new and empty: no task is served" in said[0] and str(tmp_path) in said[0], said
    assert [r.levelname for r in caplog.records if r.getMessage() == said[0]] == ["WARNING"]
    caplog.clear()
    _store(tmp_path, two_tasks["a"], two_tasks["c"])
    with caplog.at_level("INFO", logger="clipbank.service"):
        async with running_app(tmp_path, backbone):
            pass
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("store ")]
    assert len(said) == 1 and said[0].endswith(": 2 active task(s), generation 2"), said

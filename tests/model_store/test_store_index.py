"""The typed store index: what the store writes reads back the same; what older releases wrote reads with
defaults; what cannot be understood is a StoreError that names where, and nothing is written over it."""

from __future__ import annotations

import json

import pytest

from model_store.bank import empty_bank
from model_store.bundle import read_bundle
from model_store.errors import ShadowConflict, StoreError, TaskNotFound, VersionNotFound
from model_store.store import LocalStore
from model_store.store_index import StoreIndex, TaskRecord, VersionRecord
from tests.helpers import random_bundle, with_version

BID = "ab" * 32


def test_what_the_store_writes_reads_back_the_same(tmp_path, backbone):
    store = LocalStore(tmp_path)
    data = random_bundle(empty_bank(backbone), "cars", seed=1)
    store.put(data)
    store.put(with_version(data, 2), activate=False)
    on_disk = json.loads(store.index_path.read_text())
    index = store.index()
    assert index.to_json() == on_disk and StoreIndex.from_json(on_disk) == index
    record = index.task("cars")
    assert record.newest == 2 and record.active_record() == index.version("cars", 1)
    assert index.version("cars", 2).classes == ("red", "blue", "green") and index.active() == {"cars": record.active}


def test_fields_an_older_release_did_not_write_read_as_defaults():
    old = {"generation": 4, "tasks": {"t": {"active": BID, "versions": [{"version": 1, "bundle_id": BID}]}}}
    index = StoreIndex.from_json(old)
    (v,) = index.task("t").versions
    assert v == VersionRecord(1, BID) and v.classes is None and v.metrics == {} and index.format == 1
    odd = {"version": 1, "bundle_id": BID, "bytes": "12", "metrics": {"acc": "high", "val": 0.5}, "classes": "x"}
    v = StoreIndex.from_json({"generation": 1, "tasks": {"t": {"versions": [odd]}}}).version("t", 1)
    assert (v.bytes, dict(v.metrics), v.classes) == (0, {"val": 0.5}, None)  # wrong types coerced, not trusted


def test_a_version_lists_one_used_expert_per_bundle_providing_them_and_purge_keeps_those(tmp_path, backbone):
    """Listing every used expert grew as tasks squared; one per providing bundle is what a purge (of this release
    or an older one, which reads `uses` the same way) needs to keep the bundles a task's experts come from."""
    from model_store.loader import BankLoader

    store = LocalStore(tmp_path)
    store.put(random_bundle(empty_bank(backbone), "a", seed=1))
    store.put(random_bundle(BankLoader(store, backbone).load(), "b", seed=2))  # uses a's experts
    c = random_bundle(BankLoader(store, backbone).load(), "c", seed=3)  # uses a's and b's
    store.put(c)
    index = store.index()
    a, b = (index.version(t, 1) for t in "ab")
    uses = index.version("c", 1).uses
    assert len(uses) == 2 and set(uses) & set(a.experts_new) and set(uses) & set(b.experts_new)
    assert len(read_bundle(c).uses) == len(a.experts_new) + len(b.experts_new)  # the bundle still names them all
    for task in "ab":
        store.deactivate(task)
    assert store.purge("a") == 0 and store.purge("b") == 0  # c needs both: nothing deleted
    assert {v.bundle_id for _, v in store.index().records()} == {a.bundle_id, b.bundle_id, index.active()["c"]}


@pytest.mark.parametrize(
    "tasks, words",
    [
        ({"t": []}, "task 't' is not an object"),
        ({"t": {"active": None}}, "task 't' is not an object with versions"),
        ({"t": {"versions": [{"bundle_id": BID}]}}, "task 't' version entry 0 has no integer version"),
        ({"t": {"versions": [{"version": 1, "bundle_id": "../../etc"}]}}, "names bundle"),
        ({"t": {"active": 5, "versions": []}}, "has active 5"),
    ],
)
def test_a_structural_problem_is_named(tasks, words):
    with pytest.raises(StoreError, match=words):
        StoreIndex.from_json({"generation": 1, "tasks": tasks})


def test_a_malformed_index_is_refused_and_not_written_over(tmp_path, backbone):
    store = LocalStore(tmp_path)
    text = json.dumps({"generation": 2, "tasks": {"t": {"active": None, "versions": [{"version": "1"}]}}})
    store.index_path.write_text(text)
    with pytest.raises(StoreError, match="version entry 0"):
        store.index()
    with pytest.raises(StoreError):
        store.put(random_bundle(empty_bank(backbone), "cars", seed=1))
    assert store.index_path.read_text() == text


def test_lookups_name_what_is_missing():
    index = StoreIndex(3, {"t": TaskRecord((VersionRecord(1, BID),), BID)})
    with pytest.raises(TaskNotFound, match="known: t"):
        index.task("u")
    with pytest.raises(VersionNotFound, match="stored versions: 1"):
        index.version("t", 2)
    assert index.with_task("t", lambda record: None).tasks == {} and "t" in index.tasks  # copies, never edits


def test_a_version_in_shadow_is_kept_promoted_and_forgotten(tmp_path, backbone):
    """put(shadow=True) and set_shadow keep it beside the active version; activating it takes it out of the
    shadow; purge forgets it; an index without the field (an older release) reads as no shadow."""
    store = LocalStore(tmp_path)
    data = random_bundle(empty_bank(backbone), "cars", seed=1)
    store.put(data)
    v2 = store.put(with_version(data, 2), activate=False, shadow=True)
    record = store.task("cars")
    assert (
        record.shadow == v2.bundle_id
        and record.active != v2.bundle_id
        and store.index().shadows() == {"cars": v2.bundle_id}
    )
    assert json.loads(store.index_path.read_text())["tasks"]["cars"]["shadow"] == v2.bundle_id
    with pytest.raises(ShadowConflict, match="version 1 is active"):
        store.set_shadow("cars", 1)
    v3 = store.put(with_version(data, 3), shadow=True)  # in shadow, so not active
    assert store.task("cars").shadow == v3.bundle_id and store.task("cars").active != v3.bundle_id
    store.set_shadow("cars", 2)
    store.activate("cars", 2)
    assert store.task("cars").shadow is None and store.task("cars").active == v2.bundle_id
    assert store.set_shadow("cars", 1) == store.index().version("cars", 1).bundle_id
    assert store.set_shadow("cars", None) is None and store.task("cars").shadow is None
    store.set_shadow("cars", 1)
    store.deactivate("cars")
    assert store.task("cars").shadow is not None  # a shadow does not need an active version
    store.purge("cars")
    assert "cars" not in store.index().tasks
    assert StoreIndex.from_json({"generation": 1, "tasks": {"t": {"versions": []}}}).task("t").shadow is None
    with pytest.raises(StoreError, match="has shadow 5"):
        StoreIndex.from_json({"generation": 1, "tasks": {"t": {"shadow": 5, "versions": []}}})
    # an outside check's: a release without shadows activated the version in shadow, leaving it active and shadow
    both = {"generation": 1, "tasks": {"t": {"active": "a" * 64, "shadow": "a" * 64, "versions": []}}}
    assert StoreIndex.from_json(both).task("t").shadow is None and StoreIndex.from_json(both).task("t").active


def test_the_loader_keeps_only_the_selector_of_a_version_in_shadow(tmp_path, backbone):
    from model_store.loader import BankLoader

    store = LocalStore(tmp_path)
    data = random_bundle(empty_bank(backbone), "cars", seed=1)
    store.put(data, activate=False)
    store.set_shadow("cars", 1)
    loader = BankLoader(store, backbone)
    bank = loader.load()
    (entry,) = loader.shadows(store.index())
    assert not bank.tasks and (entry.name, entry.version) == ("cars", 1) and entry.selector.threshold > 0
    loader.trim()
    assert loader.shadows(store.index()) == (entry,)  # kept without its bundle
    store.set_shadow("cars", None)
    assert loader.shadows(store.index()) == ()
    store.set_shadow("cars", 1)
    (store.blobs / f"{entry.bundle_id}.safetensors").write_bytes(b"damaged")
    fresh = BankLoader(store, backbone)
    assert fresh.shadows(store.index()) == () and "does not hash" in fresh.shadow_failure(entry.bundle_id)
    assert fresh.load().generation == store.generation()  # the bank still builds and serves
    assert fresh.shadows(store.index()) == ()  # not read again at the same generation
    store.restore(read_bundle(data), data)  # the blob written back publishes a generation: read again, and scored
    assert [e.bundle_id for e in fresh.shadows(store.index())] == [entry.bundle_id]
    assert fresh.shadow_failure(entry.bundle_id) is None

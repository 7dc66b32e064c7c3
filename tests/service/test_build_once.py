"""One bank per change: the bank checked before the store is written is the one swapped in after it, unless the
store moved in between: a gated change is then checked again on the new state (never written unchecked), any other
is built again from the store (never a stale one served)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from model_store import store_base as store_module  # where put and put_validated live
from model_store.bank import build_bank, empty_bank
from model_store.bundle import MANIFEST_KEY, read_bundle
from model_store.digest import bytes_digest
from model_store.errors import BackboneMismatch, BundleInvalid, BundleNotFound, StoreMoved, VersionConflict
from model_store.loader import BankLoader
from model_store.store import LocalStore
from service import registry as registry_module
from service.registry import Registry
from tests.helpers import random_bundle, with_version


@pytest.fixture(scope="module")
def parts(backbone):
    """Bytes of tasks a (v1, v2: the same experts) and b on their own, and c, which routes to a's experts too."""
    a = random_bundle(empty_bank(backbone), "a", seed=41)
    c = random_bundle(build_bank(backbone, [read_bundle(a)]), "c", seed=43)
    b = random_bundle(empty_bank(backbone), "b", seed=42)
    return {"a": a, "a2": with_version(a, 2), "b": b, "b2": with_version(b, 2), "c": c}


@pytest.fixture
def registry(tmp_path, backbone):
    r = Registry(LocalStore(tmp_path / "store"), backbone)
    r.load()
    return r


class Builds:
    """Every bank `registry`'s loader builds (each `load` builds one), and every bank a trial run checks."""

    def __init__(self, monkeypatch, registry: Registry) -> None:
        self.banks: list = []
        self.trialled: list = []
        load, trial = registry.loader.load, registry_module.trial_run

        def counted_load(*args, **kwargs):
            self.banks.append(load(*args, **kwargs))
            return self.banks[-1]

        def recorded_trial(bank, tasks, cache=None):
            self.trialled.append(bank)
            return trial(bank, tasks, cache)

        monkeypatch.setattr(registry.loader, "load", counted_load)
        monkeypatch.setattr(registry_module, "trial_run", recorded_trial)


@pytest.fixture
def builds(monkeypatch, registry):
    """Installed once `registry` has loaded its start-up bank, so only the changes' builds are counted."""
    return Builds(monkeypatch, registry)


def _served(bank) -> list[tuple[str, int, str]]:
    return [(t.name, t.version, t.bundle_id) for t in bank.tasks]


def _same_as_fresh(registry: Registry, backbone) -> None:
    """The served bank is what a start-up on the store would serve."""
    fresh = BankLoader(registry.store, backbone).load()
    bank = registry.bank
    assert bank.generation == fresh.generation == registry.store.generation()
    assert _served(bank) == _served(fresh) and dict(bank.degraded) == dict(fresh.degraded)
    assert {e: p[:2] for e, p in bank.expert_ids.items()} == {e: p[:2] for e, p in fresh.expert_ids.items()}
    assert bank.bundle_ids == fresh.bundle_ids


def test_an_upload_builds_one_bank_and_serves_the_checked_one(registry, builds, parts, backbone):
    for n, name in enumerate(("a", "c", "a2"), start=1):
        result = registry.upload(parts[name])
        assert len(builds.banks) == n, f"upload of {name} built {len(builds.banks) - n + 1} banks"
        assert registry.bank is builds.banks[-1] is builds.trialled[-1]  # the checked bank, not a copy of it
        assert registry.bank.generation == result.generation == n
        _same_as_fresh(registry, backbone)
        assert registry.refresh() is False and len(builds.banks) == n  # the poller sees nothing to do
    assert _served(registry.bank) == [("a", 2, bytes_digest(parts["a2"])), ("c", 1, bytes_digest(parts["c"]))]
    # c's experts come from a v1, which stays in the bank's bundles (and the loader's cache) though not active
    assert bytes_digest(parts["a"]) in registry.bank.bundle_ids
    assert set(registry.loader._bundles) == set(registry.bank.bundle_ids)


def test_activate_and_deactivate_build_one_bank_each(registry, builds, parts, backbone):
    registry.upload(parts["a"])
    registry.upload(parts["a2"])
    registry.upload(parts["b"])
    steps = [
        (lambda: registry.activate("a", 1), [("a", 1), ("b", 1)], 4),
        (lambda: registry.deactivate("b"), [("a", 1)], 5),
        (lambda: registry.deactivate("b", purge=True), [("a", 1)], 6),  # inactive already: only the purge
        (lambda: registry.deactivate("a", purge=True), [], 7),  # active: deactivated and purged in one write
    ]
    for n, (change, served, generation) in enumerate(steps, start=4):
        change()
        assert len(builds.banks) == n
        assert registry.bank is builds.banks[-1]
        assert [(t.name, t.version) for t in registry.bank.tasks] == served
        assert registry.bank.generation == generation
        _same_as_fresh(registry, backbone)
    assert registry.store.index().tasks == {}


def test_an_upload_without_activation_builds_one_bank(registry, builds, parts, backbone):
    registry.upload(parts["a"])
    before = registry.bank
    registry.upload(parts["b"], activate=False)
    assert len(builds.banks) == 2
    checked = builds.trialled[-1]
    assert checked.task_names == ("a", "b")  # checked as if activated
    assert registry.bank is not checked and registry.bank.task_names == ("a",)
    assert registry.bank.tasks == before.tasks and registry.bank.generation == 2
    _same_as_fresh(registry, backbone)
    registry.activate("b", 1)
    assert len(builds.banks) == 3 and registry.bank.task_names == ("a", "b")


def test_a_store_changed_between_check_and_write_is_checked_again_not_written_unchecked(
    registry, parts, backbone, monkeypatch
):
    """A writer that ignored the lock (S3 has none) changes the store while an upload is checked: the upload is not
    written onto a state its gate never saw. It is built and checked again on the new state, and lands there."""
    registry.upload(parts["a"])
    registry.upload(parts["b"])
    builds = Builds(monkeypatch, registry)
    put = registry.store.put_validated
    interfered = []

    def put_after_another_writer(*args, **kwargs):
        if not interfered:  # the store's lock is re-entrant in this process, so the other writer gets in
            interfered.append(registry.store.deactivate("a"))
        return put(*args, **kwargs)

    monkeypatch.setattr(registry.store, "put_validated", put_after_another_writer)
    result = registry.upload(parts["b2"])
    first, second = builds.trialled
    assert first.task_names == ("a", "b") and first.generation == 3  # what the store held at the check, + 1
    assert second.task_names == ("b",) and second.generation == 4  # checked again: a was deactivated meanwhile
    assert result.generation == registry.store.generation() == 4
    assert len(builds.banks) == 3 and registry.bank is builds.banks[-1] is second  # the second check is served
    assert [(t.name, t.version) for t in registry.bank.tasks] == [("b", 2)]
    _same_as_fresh(registry, backbone)
    assert registry.refresh() is False


def test_a_store_that_keeps_moving_under_a_gated_change_gets_503_store_busy(registry, parts, monkeypatch):
    registry.upload(parts["a"])
    put = registry.store.put_validated

    def put_after_another_writer(*args, **kwargs):
        registry.store._change(lambda index: index)  # another writer: generation + 1 between check and write
        return put(*args, **kwargs)

    monkeypatch.setattr(registry.store, "put_validated", put_after_another_writer)
    with pytest.raises(StoreMoved, match="3 times; other servers are changing it: try again"):
        registry.upload(parts["b"])
    assert set(registry.store.index().tasks) == {"a"}  # nothing of b was written
    assert registry.bank.generation == registry.store.generation()  # serving the store's state


def test_a_change_on_a_stale_bank_serves_the_store_plus_the_change(registry, builds, parts, backbone, tmp_path):
    LocalStore(tmp_path / "store").put(parts["b"])  # another server; this one has not polled yet
    assert registry.bank.generation == 0
    registry.upload(parts["a"])
    assert len(builds.banks) == 1 and registry.bank is builds.banks[0]
    assert registry.bank.task_names == ("a", "b") and registry.bank.generation == 2
    _same_as_fresh(registry, backbone)


def test_an_upload_is_read_once_and_stored_without_a_second_read(registry, builds, parts, monkeypatch):
    calls = {"registry.read_bundle": 0, "store_base.read_bundle": 0, "store_base.bytes_digest": 0}

    def counting(module, name):
        real = getattr(module, name)

        def wrapped(*args, **kwargs):
            calls[f"{module.__name__.split('.')[-1]}.{name}"] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    counting(registry_module, "read_bundle")
    counting(store_module, "read_bundle")
    counting(store_module, "bytes_digest")
    registry.upload(parts["a"])
    assert calls == {"registry.read_bundle": 1, "store_base.read_bundle": 0, "store_base.bytes_digest": 0}
    assert registry.store.read(bytes_digest(parts["a"])) == parts["a"]


def test_put_still_validates_what_it_is_handed(tmp_path, parts):
    store = LocalStore(tmp_path / "store")
    wrong = read_bundle(parts["a"])
    result = store.put(parts["b"], bundle=wrong)  # the bundle is not these bytes: they are read instead
    assert (result.task, result.bundle_id) == ("b", bytes_digest(parts["b"]))
    with pytest.raises(ValueError, match="bytes"):
        store.put_validated(wrong, parts["c"])
    assert list(store.index().tasks) == ["b"]


def _other_backbone(data: bytes, edit=lambda manifest: None) -> bytes:
    tensors = st_load(data)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    manifest["backbone"]["fingerprint"] = "0" * 64
    edit(manifest)
    return st_save(tensors, metadata={MANIFEST_KEY: json.dumps(manifest)})


def test_another_backbone_is_refused_from_the_header_before_the_tensors_are_read(registry, builds, parts, monkeypatch):
    reads = []
    monkeypatch.setattr(registry_module, "read_bundle", lambda data: reads.append(data))
    with pytest.raises(BackboneMismatch, match="does not match the served backbone"):
        registry.upload(_other_backbone(parts["a"]))
    with pytest.raises(BackboneMismatch):
        registry.upload(_other_backbone(parts["a"])[:-8])  # a damaged payload: the header is enough to refuse it
    assert reads == [] and builds.banks == [] and registry.store.index().tasks == {}
    assert registry.metrics.swap_failures._value.get() == 0  # a refused upload, not a failed swap
    monkeypatch.setattr(registry_module, "read_bundle", read_bundle)
    with pytest.raises(BundleInvalid, match="invalid bundle manifest"):  # a manifest that is not one: read_bundle's
        registry.upload(_other_backbone(parts["a"], lambda m: m.pop("classes")))


def test_a_failed_bank_build_is_counted_a_refused_upload_is_not(registry, parts, monkeypatch):
    """`clipbank_swap_failures_total` counts changes the server could not serve, which an operator must look at
    (a damaged store too, though its error is a 4xx); a refusal of the request (the gate, its own bundle) is the
    client's, counted by its status and the gate (tests/service/test_gate.py)."""
    failures = [VersionConflict("another writer took version 1"), BundleNotFound("a blob is missing"), MemoryError()]

    def failing(*args, **kwargs):
        raise failures.pop(0)

    monkeypatch.setattr(registry_module, "trial_run", failing)
    for kind, counted in ((VersionConflict, 0), (BundleNotFound, 1), (MemoryError, 2)):
        with pytest.raises(kind):
            registry.upload(parts["a"])
        assert registry.metrics.swap_failures._value.get() == counted, kind
    assert registry.store.index().tasks == {}


def test_an_uploads_class_embeddings_are_encoded_a_chunk_per_compute_job(tmp_path, backbone):
    """A security check: a bundle of 10,000 classes x 10 templates (the bound) was one job of its trial run on
    the compute thread, 78 s on tiny, and every /classify waited that long. Its prompts are now encoded a chunk
    per job, with batches between them; the trial run then finds them cached, and encodes nothing again."""
    from model_store.bank import empty_bank
    from model_store.text import TEXT_CHUNK, TextCache, TextJob
    from tests.helpers import random_bundle

    registry = Registry(LocalStore(tmp_path / "store"), backbone, cache=TextCache())
    registry.load()
    jobs: list[str] = []
    registry.run_torch = lambda fn, *args: jobs.append(getattr(fn, "__name__", "?")) or fn(*args)
    encoded: list[int] = []
    step = TextJob.step

    def counted(self, n=TEXT_CHUNK):
        before = self.remaining
        done = step(self, n)
        encoded.append(before - self.remaining)
        return done

    classes = tuple(f"class {i}" for i in range(600))  # 600 prompts with the bundle's one template
    TextJob.step = counted
    try:
        registry.upload(random_bundle(empty_bank(backbone), "many", seed=1, classes=classes))
    finally:
        TextJob.step = step
    assert jobs.count("counted") >= 3 and max(encoded) <= TEXT_CHUNK  # each chunk its own job
    assert sum(encoded) == 600 and jobs.index("trial_run") > jobs.index("get_or_compute")  # encoded once, before


def test_twin_classes_are_refused_after_one_encoding_not_two(tmp_path, backbone):
    """The review: classes the tokenizer reads as one ("Cat", "cat") were encoded in chunks, refused there in
    silence, then encoded again in one job by the trial run, which refused them."""
    from model_store.bank import empty_bank
    from model_store.text import TextCache, TextJob
    from tests.helpers import random_bundle

    registry = Registry(LocalStore(tmp_path / "store"), backbone, cache=TextCache())
    registry.load()
    encoded: list[int] = []
    step = TextJob.step

    def counted(self, n=256):
        before = self.remaining
        done = step(self, n)
        encoded.append(before - self.remaining)
        return done

    TextJob.step = counted
    try:
        with pytest.raises(BundleInvalid, match="fails a trial classification: InvalidRequest: labels"):
            registry.upload(random_bundle(empty_bank(backbone), "twins", seed=1, classes=("Cat", "cat", "dog")))
    finally:
        TextJob.step = step
    assert sum(encoded) == 3 and not registry.store.index().tasks  # once, and nothing stored


def test_a_changes_store_reads_run_beside_the_compute_thread_not_on_it(registry, parts, monkeypatch):
    """An outside check's S3 answering in 3 s: every classification stalled 3 s once per change, as the gate read
    the store's index on the compute thread. Its model work stays there; its store reads run in the change's."""
    on_compute: list[bool] = []

    def run_torch(fn, *args):
        on_compute.append(True)
        try:
            return fn(*args)
        finally:
            on_compute.pop()

    registry.run_torch = run_torch
    reads: list[bool] = []
    index, generation = registry.store.index, registry.store.generation
    monkeypatch.setattr(registry.store, "index", lambda *a, **k: reads.append(bool(on_compute)) or index(*a, **k))
    monkeypatch.setattr(
        registry.store, "generation", lambda *a, **k: reads.append(bool(on_compute)) or generation(*a, **k)
    )
    registry.upload(parts["a"])
    registry.upload(parts["a2"], activate=False)
    registry.activate("a", 2)
    registry.shadow("a", 1)
    assert len(reads) >= 4 and not any(reads), reads

"""One contract, both backends: every test here runs on the local folder and on S3 (a real S3 API server on
127.0.0.1: moto's server mode, which implements conditional writes)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from model_store.bank import empty_bank
from model_store.bundle import read_bundle
from model_store.errors import (
    BundleNotFound,
    ShadowConflict,
    StoreDamaged,
    StoreError,
    StoreNotWritable,
    StoreUnavailable,
    TaskNotFound,
    VersionConflict,
    VersionNotFound,
)
from model_store.store import LocalStore, open_store
from model_store.store_index import StoreIndex
from tests.helpers import random_bundle

BACKENDS = ["local", "s3"]


@pytest.fixture(params=BACKENDS)
def make_store(request, tmp_path):
    """A factory: each call opens another handle on the same store (another process, another replica)."""
    if request.param == "local":
        return lambda: open_store(tmp_path / "store")
    bucket = request.getfixturevalue("s3_env")
    return lambda: open_store(f"s3://{bucket}/bank")


@pytest.fixture(scope="module")
def bundles(backbone):
    bank = empty_bank(backbone)
    return {v: random_bundle(bank, "cars", seed=10 + v, version=v) for v in (1, 2, 3)}


def blob_ids(store) -> set[str]:
    if isinstance(store, LocalStore):
        return {p.stem for p in store.blobs.glob("*.safetensors")}
    listing = store._s3.list_objects_v2(Bucket=store.bucket, Prefix=store._key("blobs/"))
    return {o["Key"].rsplit("/", 1)[-1].removesuffix(".safetensors") for o in listing.get("Contents", [])}


def test_put_activate_rollback_deactivate_purge(make_store, bundles):
    store = make_store()
    assert store.index() == StoreIndex() and store.generation() == 0
    r1, r2 = store.put(bundles[1]), store.put(bundles[2])
    assert (r1.version, r2.version, r2.generation) == (1, 2, 2)
    assert store.active() == {"cars": r2.bundle_id}
    assert store.activate("cars", 1) == r1.bundle_id and store.active() == {"cars": r1.bundle_id}
    with pytest.raises(VersionConflict, match="this bundle is stored already: task 'cars' version 1"):
        store.put(bundles[1])  # the same bytes again (another bundle of an old version: test_store.py)
    with pytest.raises(VersionNotFound, match="stored versions: 1, 2"):
        store.activate("cars", 7)
    with pytest.raises(TaskNotFound):
        store.activate("boats", 1)
    with pytest.raises(StoreError, match="deactivate it before purging"):
        store.purge("cars")
    store.deactivate("cars")
    assert store.active() == {} and store.load(r2.bundle_id).version == 2  # blobs stay for rollback
    assert blob_ids(store) == {r1.bundle_id, r2.bundle_id}
    assert store.purge("cars") == 2
    assert blob_ids(store) == set() and store.index().tasks == {}
    with pytest.raises(BundleNotFound):
        make_store().read(r1.bundle_id)  # a fresh handle: no cached copy
    store.put(bundles[1])
    store.put(bundles[2], shadow=True)
    generation = store.generation()  # an active task with a shadow, forgotten in one index write (an outside
    assert store.purge("cars", deactivate=True) == 2  # check's kill between a deactivation and a purge left it
    assert store.index().tasks == {} and blob_ids(store) == set()  # (S3: one more write clears `deleting`)
    assert store.generation() == generation + (2 if "s3" in type(store).__name__.lower() else 1)


def test_shadow_operations(make_store, bundles):
    store = make_store()
    store.put(bundles[1])
    r2 = store.put(bundles[2], shadow=True)
    assert store.index().shadows() == {"cars": r2.bundle_id} and store.active()["cars"] != r2.bundle_id
    with pytest.raises(ShadowConflict):
        store.set_shadow("cars", 1)  # the active version
    generation = store.generation()
    assert store.set_shadow("cars", 2) == r2.bundle_id  # in shadow already: nothing is written
    assert store.generation() == generation and store.index().shadows() == {"cars": r2.bundle_id}
    store.activate("cars", 2)  # promotion takes it out of the shadow
    assert store.index().shadows() == {} and store.active() == {"cars": r2.bundle_id}


def test_two_handles_see_each_other_and_the_generation_only_grows(make_store, bundles):
    a, b = make_store(), make_store()
    seen = [b.generation()]
    a.put(bundles[1])
    seen.append(b.generation())
    b.put(bundles[2], activate=False)
    seen.append(a.generation())
    a.activate("cars", 2)
    seen.append(b.generation())
    assert seen == [0, 1, 2, 3] and b.active() == a.active()


def test_blobs_are_verified_on_every_read(make_store, bundles):
    store = make_store()
    r = store.put(bundles[1])
    damaged = bytearray(bundles[1])
    damaged[-1] ^= 0xFF
    if isinstance(store, LocalStore):
        (store.blobs / f"{r.bundle_id}.safetensors").write_bytes(bytes(damaged))
    else:
        store._s3.put_object(Bucket=store.bucket, Key=store._blob_key(r.bundle_id), Body=bytes(damaged))
    with pytest.raises(StoreError, match="does not hash to its name"):
        make_store().read(r.bundle_id)


def test_a_missing_or_damaged_blob_is_restored_from_its_own_bytes(make_store, bundles):
    store = make_store()
    r = store.put(bundles[1])
    bundle = read_bundle(bundles[1])
    assert store.restore(bundle, bundles[1]) is None  # whole: nothing to do, nothing published
    assert store.generation() == r.generation
    for damage in ("flip", "delete"):
        if isinstance(store, LocalStore):
            path = store.blobs / f"{r.bundle_id}.safetensors"
            path.write_bytes(bundles[1][:-1] + b"!") if damage == "flip" else path.unlink()
        elif damage == "flip":
            store._s3.put_object(Bucket=store.bucket, Key=store._blob_key(r.bundle_id), Body=bundles[1][:-1] + b"!")
        else:
            store._s3.delete_object(Bucket=store.bucket, Key=store._blob_key(r.bundle_id))
        other = make_store()  # another replica: its own cache must not hide the damage
        generation = other.restore(bundle, bundles[1])
        assert generation == other.generation() and store.read(r.bundle_id) == bundles[1]
        assert make_store().read(r.bundle_id) == bundles[1]
    assert store.task("cars").active == r.bundle_id
    with pytest.raises(BundleNotFound, match="no stored version"):
        store.restore(read_bundle(bundles[2]), bundles[2])
    with pytest.raises(ValueError, match="not read from these bytes"):
        store.restore(bundle, bundles[2])


def test_eight_writers_race_and_no_update_is_lost(make_store, backbone):
    """Eight handles put eight tasks at once: each put lands once, the generation counts all eight."""
    bank = empty_bank(backbone)
    datas = [random_bundle(bank, f"task{i}", seed=20 + i) for i in range(8)]
    handles = [make_store() for _ in range(8)]
    barrier = threading.Barrier(8)

    def put(i: int):
        barrier.wait()
        return handles[i].put(datas[i]).generation

    with ThreadPoolExecutor(8) as pool:
        generations = sorted(pool.map(put, range(8)))
    assert generations == list(range(1, 9))  # one winner per round
    store = make_store()
    assert sorted(store.active()) == [f"task{i}" for i in range(8)] and store.generation() == 8


def test_a_put_that_loses_its_race_gets_a_version_conflict(make_store, backbone):
    bank = empty_bank(backbone)
    rivals = [random_bundle(bank, "cars", seed=s) for s in (1, 2)]  # two different version-1 bundles
    handles, barrier, outcomes = [make_store(), make_store()], threading.Barrier(2), []

    def put(i: int):
        barrier.wait()
        try:
            outcomes.append(handles[i].put(rivals[i]).bundle_id)
        except VersionConflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=put, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(outcomes, key=len)[0] == "conflict" and make_store().active()["cars"] in outcomes


def test_a_purge_never_deletes_a_blob_its_index_names(make_store, backbone):
    """b uses a's experts: purging a keeps the version that adds them, inactive, and its blob."""
    from model_store.loader import BankLoader

    store = make_store()
    ra = store.put(random_bundle(empty_bank(backbone), "a", seed=1))
    store.put(random_bundle(BankLoader(store, backbone).load(), "b", seed=2))
    store.deactivate("a")
    assert store.purge("a") == 0
    assert ra.bundle_id in blob_ids(store) and make_store().read(ra.bundle_id)


def race_put_and_purge(store, other, data: bytes) -> None:
    """`store` purges task cars while `other` puts `data` (cars version 1) again, started together."""
    barrier = threading.Barrier(2)

    def purge():
        barrier.wait()
        store.purge("cars")

    def put():
        barrier.wait()
        try:
            other.put(data)
        except VersionConflict:  # the purge had not published yet: version 1 was still stored
            pass

    threads = [threading.Thread(target=purge), threading.Thread(target=put)]
    [t.start() for t in threads]
    [t.join() for t in threads]


def test_a_put_racing_a_purge_of_the_same_bytes_keeps_its_blob(make_store, bundles):
    """Whichever of the two wins, an index that names the blob has the blob."""
    store, other = make_store(), make_store()
    for _ in range(5):
        if "cars" not in store.index().tasks:
            store.put(bundles[1])
        store.deactivate("cars")
        race_put_and_purge(store, other, bundles[1])
        named = {v.bundle_id for _, v in make_store().index().records()}
        assert named <= blob_ids(store)
        for bundle_id in named:
            make_store().read(bundle_id)


def test_an_s3_store_whose_endpoint_is_down_fails_clearly(monkeypatch, tmp_path, bundles):
    pytest.importorskip("boto3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("CLIPBANK_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("CLIPBANK_S3_CACHE_DIR", str(tmp_path))
    store = open_store("s3://clipbank-down/bank")
    with pytest.raises(StoreUnavailable, match="could not read the index") as e:
        store.put(bundles[1])
    assert "testing" not in str(e.value)
    with pytest.raises(StoreUnavailable, match="could not read the index"):
        store.index()


def test_an_s3_endpoint_that_hangs_fails_in_seconds_not_minutes(monkeypatch, tmp_path):
    """An endpoint that takes the connection and never answers (a paused server): each call gives up after its
    read timeout and attempts, as a 503 store_unavailable. Before, 60 s x 3 attempts per call."""
    import socket
    import time

    from model_store import store_s3

    pytest.importorskip("boto3")
    for name, value in {
        "AWS_ACCESS_KEY_ID": "t",
        "AWS_SECRET_ACCESS_KEY": "t",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    backoff = 2**store_s3.S3_ATTEMPTS - 1  # at most 1 s, then 2 s, between attempts
    shipped = store_s3.S3_READ_SECONDS * (store_s3.S3_ATTEMPTS + 1) + backoff
    monkeypatch.setattr(store_s3, "S3_READ_SECONDS", 0.5)
    with socket.socket() as hung:  # listening, never accepting: the kernel completes the connection
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        monkeypatch.setenv("CLIPBANK_S3_ENDPOINT_URL", f"http://127.0.0.1:{hung.getsockname()[1]}")
        monkeypatch.setenv("CLIPBANK_S3_CACHE_DIR", str(tmp_path))
        store = open_store("s3://clipbank-hung/bank")
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match="could not read the index"):
            store.index()
        took = time.monotonic() - start
    assert took < 0.5 * (store_s3.S3_ATTEMPTS + 1) + backoff + 2, took
    assert shipped <= 35  # with the shipped timeouts, a hung call costs at most 35 s


def test_locations_are_checked():
    with pytest.raises(StoreError, match="local folder or s3://"):
        open_store("gs://bucket/x")
    with pytest.raises(StoreError, match="s3://bucket"):
        open_store("s3:///x")


def _delete_index(store) -> None:
    if isinstance(store, LocalStore):
        store.index_path.unlink()
    else:
        store._s3.delete_object(Bucket=store.bucket, Key=store._key("index.json"))


def test_a_lost_index_is_damage_on_every_backend(make_store, bundles):
    """On S3 a lost index read as an empty store: generations restarted, and the next purge deleted every bundle."""
    store = make_store()
    store.put(bundles[1])
    _delete_index(store)
    with pytest.raises(StoreDamaged, match="index.json is missing but"):
        make_store().index()


def test_a_store_deleted_under_a_reader_is_damage_not_an_empty_store(make_store, bundles):
    """An outside check deleted a running server's store folder: the next poll read it as empty and dropped every
    task (generation 26 -> 0), and a failed upload then wrote a generation-0 index, after which a purge deleted
    the blobs the operator had put back."""
    store = make_store()
    store.put(bundles[1])
    generation = store.generation()
    _wipe(store)
    with pytest.raises(StoreDamaged, match=rf"index.json is gone \(it was at generation {generation}"):
        store.index()
    with pytest.raises(StoreDamaged, match="is gone"):
        store.put(bundles[2])
    if isinstance(store, LocalStore):
        assert not store.index_path.exists()  # nothing written
    assert make_store().index().generation == 0  # a new handle (a restarted server): a new, empty store


def _wipe(store) -> None:
    if isinstance(store, LocalStore):
        import shutil

        shutil.rmtree(store.root)
    else:
        for key in [o["Key"] for o in store._s3.list_objects_v2(Bucket=store.bucket)["Contents"]]:
            store._s3.delete_object(Bucket=store.bucket, Key=key)


def test_a_store_wiped_and_made_again_under_a_reader_is_damage(make_store, bundles):
    """An outside check's: a store emptied and refilled between two polls, to the generation a server had read,
    was taken for the same store; the server served a bank the store no longer held, with no error."""
    reader = make_store()
    reader.put(bundles[1])
    reader.put(bundles[2])
    first = reader.index()
    assert first.store_id is not None and first.generation == 2
    _wipe(reader)
    again = make_store()  # another process makes a new store there, to the same generation
    again.put(bundles[1])
    again.put(bundles[3])
    assert again.generation() == 2 and again.index().store_id != first.store_id
    with pytest.raises(StoreDamaged, match="was replaced under this process .its index.json is another store's"):
        reader.index()
    with pytest.raises(StoreDamaged, match="was replaced"):
        reader.put(bundles[2])
    assert make_store().index() == again.index()  # a restarted server serves the store as it now is


def test_a_store_whose_generation_goes_back_under_a_reader_is_damage(make_store, bundles):
    """A backup restored under a running server (or an older release's write of the index it read before)."""
    store = make_store()
    store.put(bundles[1])
    old = store.index().to_json()
    store.put(bundles[2])
    if isinstance(store, LocalStore):
        store.index_path.write_text(json.dumps(old))
    else:
        store._s3.put_object(Bucket=store.bucket, Key=store._key("index.json"), Body=json.dumps(old).encode())
    with pytest.raises(StoreDamaged, match="went back from generation 2"):
        store.index()
    assert make_store().index().generation == 1


def test_an_index_written_without_a_store_id_keeps_the_one_read_before(make_store, bundles):
    """An older release writes the index without its id: a reader takes it, and its next write puts the id back."""
    store = make_store()
    store.put(bundles[1])
    store_id = store.index().store_id
    older = {k: v for k, v in {**store.index().to_json(), "generation": 2}.items() if k != "store_id"}
    if isinstance(store, LocalStore):
        store.index_path.write_text(json.dumps(older))
    else:
        store._s3.put_object(Bucket=store.bucket, Key=store._key("index.json"), Body=json.dumps(older).encode())
    assert store.index().generation == 2 and store.index().store_id is None
    store.put(bundles[2])
    assert store.index().store_id == store_id and make_store().index().store_id == store_id
    # a reviewer's: once an older release dropped the id, a new process makes another; readers take it
    _write_index(store, {k: v for k, v in {**store.index().to_json(), "generation": 4}.items() if k != "store_id"})
    assert store.index().store_id is None
    fresh = make_store()
    fresh.put(bundles[3])
    assert fresh.index().store_id not in (None, store_id) and store.index().store_id == fresh.index().store_id


def test_an_id_made_again_after_an_older_releases_write_the_reader_missed_is_the_same_store(make_store, bundles):
    """An upgrade check's: an older release's write (dropping the id) then a new process's (making another), both
    between two polls of a server, read as a replaced store: 503 store_damaged on every change, a stale bank."""
    reader, writer = make_store(), make_store()
    reader.put(bundles[1])
    first = reader.index()
    assert first.store_id_since == 1 and writer.index() == first  # made by the store's first change

    def older_release_writes(generation: int) -> None:
        dropped = ("store_id", "store_id_since")
        _write_index(
            reader, {k: v for k, v in first.to_json().items() if k not in dropped} | {"generation": generation}
        )

    older_release_writes(2)  # the reader does not poll in between
    fresh = make_store()
    fresh.put(bundles[2])
    made = fresh.index()
    assert made.store_id not in (None, first.store_id) and made.store_id_since == 3
    assert reader.index() == made  # the same store, its id made after all the reader had read
    # the review's: then the id is put back by a writer that had read it, after the reader took the newer one
    older_release_writes(4)
    writer.put(bundles[3])
    back = writer.index()
    assert (back.store_id, back.store_id_since) == (first.store_id, 5)
    assert reader.index() == back  # the same store too, not a replaced one


def _write_index(store, obj: dict) -> None:
    if isinstance(store, LocalStore):
        store.index_path.write_text(json.dumps(obj))
    else:
        store._s3.put_object(Bucket=store.bucket, Key=store._key("index.json"), Body=json.dumps(obj).encode())


def test_a_read_begun_before_a_write_seen_meanwhile_is_not_a_replaced_store(make_store, bundles, monkeypatch):
    """A reviewer's: a poll parsing generation N while another thread's change published N + 1 read as "went back
    from generation N + 1": 503 store_damaged, which no client retries."""
    import model_store.store as local_module
    import model_store.store_s3 as s3_module

    store = make_store()
    store.put(bundles[1])
    module = local_module if isinstance(store, LocalStore) else s3_module
    real, writes = module.parse_index, []

    def slow_parse(data, location):
        if not writes:  # another thread's change lands while this read parses the older bytes
            writes.append(None)
            writes[0] = store.put(bundles[2])
        return real(data, location)

    monkeypatch.setattr(module, "parse_index", slow_parse)
    if not isinstance(store, LocalStore):
        store._cached = None  # a full GET, so the parse runs
    assert store.index().generation in (1, 2) and writes[0].generation == 2
    monkeypatch.setattr(module, "parse_index", real)
    assert store.index().generation == 2


def test_an_index_of_a_newer_format_is_served_from_but_not_changed(make_store, bundles):
    """A newer release's index: rewriting it would drop what this release does not know."""
    store = make_store()
    store.put(bundles[1])
    newer = {**store.index().to_json(), "format": 2, "future": {"kept": True}}
    if isinstance(store, LocalStore):
        store.index_path.write_text(json.dumps(newer))
    else:
        store._s3.put_object(Bucket=store.bucket, Key=store._key("index.json"), Body=json.dumps(newer).encode())
    other = make_store()
    assert list(other.index().tasks) == ["cars"]
    with pytest.raises(StoreError, match="format 2, written by a newer clipbank") as refused:
        other.put(bundles[2])
    assert refused.value.code == "store_too_new"  # 503 without Retry-After: only an upgrade helps (an operator's)
    from service.errors import error_response, status_of

    response = error_response(status_of(refused.value), refused.value.code, str(refused.value))
    assert response.status_code == 503 and "retry-after" not in response.headers


def test_s3_a_write_that_landed_though_its_answer_was_lost_counts(make_store, bundles, monkeypatch):
    """S3 applied an index write but answered 503; the client's retry then failed its own If-Match (412). The
    put answered 409 though its version was stored, and a purge left its blob listed as being deleted."""
    store = make_store()
    if isinstance(store, LocalStore):
        pytest.skip("an object store's conditional write")
    from botocore.exceptions import ClientError

    real = store._s3.put_object

    def applied_then_412(**kw):
        answer = real(**kw)
        if kw["Key"].endswith("index.json") and "IfMatch" in kw:
            raise ClientError(
                {"Error": {"Code": "PreconditionFailed"}, "ResponseMetadata": {"HTTPStatusCode": 412}}, "PutObject"
            )
        return answer

    monkeypatch.setattr(store._s3, "put_object", applied_then_412)
    store.put(bundles[1])
    assert store.put(bundles[2]).version == 2 and [v.version for v in store.task("cars").versions] == [1, 2]
    store.deactivate("cars")
    assert store.purge("cars") == 2 and store.index().deleting == {} and blob_ids(store) == set()


def test_a_store_that_refuses_writes_is_not_writable_on_every_backend(make_store, bundles, monkeypatch):
    """A read-only folder (EROFS) or a bucket whose credentials may read but not write (403): every change is
    StoreNotWritable (503 without a Retry-After: no retry heals it), nothing changes, and reads still work."""
    import errno
    import tempfile

    store = make_store()
    store.put(bundles[1])
    before = store.index()
    if isinstance(store, LocalStore):

        def refuse(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    else:
        from botocore.exceptions import ClientError

        def refuse(**kw):
            raise ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Put")

        monkeypatch.setattr(store._s3, "put_object", refuse)
    for change in (lambda: store.put(bundles[2]), lambda: store.deactivate("cars")):
        with pytest.raises(StoreNotWritable, match="nothing was changed.*not writable.*will not help"):
            change()
    assert make_store().index() == before and make_store().load(before.task("cars").active).task == "cars"
    if not isinstance(store, LocalStore):  # a 403 of keys expired or a skewed clock is no policy: worth a retry

        def expired(**kw):
            raise ClientError({"Error": {"Code": "ExpiredToken"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Put")

        monkeypatch.setattr(store._s3, "put_object", expired)
        with pytest.raises(StoreUnavailable, match="ExpiredToken"):
            store.deactivate("cars")


def test_s3_a_cache_disk_that_cannot_be_written_costs_a_fetch_not_the_blob(make_store, bundles, monkeypatch):
    import model_store.store_s3 as s3_module

    store = make_store()
    if isinstance(store, LocalStore):
        pytest.skip("the object store's local cache")
    store.put(bundles[1])

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(s3_module, "atomic_write", full)
    other = make_store()
    other.cache = other.cache.parent / "empty-cache"
    assert other.load(store.task("cars").active).task == "cars"


def test_s3_settings_that_cannot_work_are_refused_by_name_before_any_call(tmp_path, monkeypatch):
    """An outside check's: `S3://` became a local folder "S3:" (a traceback in `store list`, a silent local store
    for `train`), an endpoint without its scheme and an unmakeable cache were tracebacks after the backbone had
    loaded, and an endpoint's user:password went to the log with every error about it."""
    from model_store.store_s3 import S3Store

    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match=r"not S3:// \(write the scheme in lower case: s3://bank/p\)"):
        open_store("S3://bank/p")
    assert not (tmp_path / "S3:").exists()
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    env = {"CLIPBANK_S3_CACHE_DIR": str(tmp_path / "cache")}
    with pytest.raises(StoreError, match="CLIPBANK_S3_ENDPOINT_URL must be an http:// or https:// URL, got '127"):
        S3Store.from_url("s3://bank/p", {**env, "CLIPBANK_S3_ENDPOINT_URL": "127.0.0.1:5055"})
    with pytest.raises(StoreError, match="holds credentials") as refused:
        S3Store.from_url("s3://bank/p", {**env, "CLIPBANK_S3_ENDPOINT_URL": "http://minio:s3cr3t@127.0.0.1:9"})
    assert "s3cr3t" not in str(refused.value)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(StoreError, match="local blob cache .* cannot be made .*set CLIPBANK_S3_CACHE_DIR"):
        S3Store.from_url("s3://bank/p", {"CLIPBANK_S3_CACHE_DIR": str(tmp_path / "a-file" / "cache")})


def test_store_check_reads_what_is_stored_past_the_local_cache(make_store, bundles, capsys):
    """An outside check's: a blob deleted from the bucket still served from this machine's cache, and `clipbank
    store check` refused an S3 store; so nothing could audit one."""
    from clipbank.cli import main
    from model_store.store_check import check_store, store_leftovers

    store = make_store()
    put = store.put(bundles[1])
    store.put(bundles[2])
    assert store.read(put.bundle_id)  # cached now, on S3
    assert check_store(store.location) == [] and store_leftovers(store.location)["unreferenced_blobs"] == 0
    if isinstance(store, LocalStore):
        (store.blobs / f"{put.bundle_id}.safetensors").unlink()
    else:
        store._s3.delete_object(Bucket=store.bucket, Key=store._blob_key(put.bundle_id))
        assert store.read(put.bundle_id)  # the cache still has it
    (problem,) = check_store(store.location)
    assert problem.startswith(f"task 'cars' version 1: its blob {put.bundle_id[:12]} is missing or damaged")
    assert main(["store", "--store", store.location, "check"]) == 1
    assert "missing or damaged" in capsys.readouterr().out
    assert main(["store", "--store", store.location, "check", "--json"]) == 1  # for a script
    said = json.loads(capsys.readouterr().out)
    assert said["consistent"] is False and said["problems"] == [problem] and "unreferenced_blobs" in said["leftovers"]
    # activating it: it read from this machine's cache and passed, and a fresh server degraded the task
    assert main(["store", "--store", store.location, "activate", "cars", "1"]) == 2
    err = capsys.readouterr().err
    assert f"needs blob(s) {put.bundle_id[:12]}" in err or "missing" in err, err
    assert store.index().task("cars").active != put.bundle_id
    # a corrupt index is the check's to name, on both backends (on S3 it was exit 2, "corrupt ...; see the log")
    for garbage, said in ((b'{"format":1,"generation":21, x', "index.json does not parse"), (b'{"tasks": 3}', "")):
        if isinstance(store, LocalStore):
            (store.root / "index.json").write_bytes(garbage)
        else:
            store._s3.put_object(Bucket=store.bucket, Key=store._key("index.json"), Body=garbage)
        assert main(["store", "--store", store.location, "check"]) == 1
        out = capsys.readouterr().out
        assert out.startswith("index.json") and said in out, out


def test_an_s3_index_write_without_an_answer_says_it_may_have_landed(s3_env, bundles, monkeypatch):
    """The index PUT landed but its answer timed out: the 503 read "could not write the index", and the version
    was live (an outside check with a proxy delaying index PUTs)."""
    from botocore.exceptions import ReadTimeoutError

    from model_store.errors import StoreUnavailable

    store = open_store(f"s3://{s3_env}/bank")
    store.put(bundles[1])
    real = store._s3.put_object

    def landed_but_unanswered(**kw):
        real(**kw)
        if kw["Key"].endswith("index.json"):
            raise ReadTimeoutError(endpoint_url="http://s3.test")

    monkeypatch.setattr(store._s3, "put_object", landed_but_unanswered)
    with pytest.raises(StoreUnavailable, match="it may have landed: GET /tasks says"):
        store.put(bundles[2])
    assert open_store(f"s3://{s3_env}/bank").active() == {"cars": read_bundle(bundles[2]).id}


def test_s3_calls_are_still_retried_after_an_outage(s3_env, bundles, monkeypatch):
    """A scale-out check's: servers that had lived through an outage failed most changes on a 30% SlowDown where
    a fresh one passed. botocore's standard retry mode spends a shared quota on retries and refills it only from
    2xx answers; a polling server's answers are 304s, so after an outage it never retried again."""
    import types

    import botocore.endpoint
    from botocore.awsrequest import AWSResponse

    monkeypatch.setattr(botocore.endpoint, "time", types.SimpleNamespace(sleep=lambda seconds: None))  # no backoff

    class Body:
        def stream(self, **kw):
            return iter([b""])

    store = open_store(f"s3://{s3_env}/bank")
    store.put(bundles[1])
    fail = {"all": False, "next": 0, "sent": 0}

    def fault(request, **kw):
        fail["sent"] += 1
        if fail["all"] or fail["next"] > 0:
            fail["next"] -= 1
            return AWSResponse(request.url, 503, {}, Body())
        return None

    store._s3.meta.events.register_first("before-send.s3", fault)
    fail["all"] = True
    for _ in range(60):  # about a minute of one-second polls
        with pytest.raises(StoreUnavailable):
            store.index()
    fail["all"] = False
    for _ in range(20):
        store.index()  # answered 304: the index did not change
    fail.update(next=1, sent=0)
    store.put(bundles[2])  # its first request is answered 503, and retried
    assert fail["sent"] >= 3 and store.active() == {"cars": read_bundle(bundles[2]).id}


def test_a_damaged_leftover_blob_is_replaced_by_a_put_of_its_bundle(make_store, bundles):
    """An outside check: a damaged copy no version names (a purged version's, a killed writer's) was kept by a new
    upload of the same bundle, answered 201, and every other server then found the task damaged."""
    from model_store.digest import bytes_digest

    data = bundles[2]
    bundle_id = bytes_digest(data)
    for leftover in (data[: len(data) // 2], data[:-1] + bytes([data[-1] ^ 1])):  # shorter; same size, a bit flipped
        store = make_store()
        store.put(bundles[1])  # the store exists: its index and one blob
        if isinstance(store, LocalStore):
            (store.blobs / f"{bundle_id}.safetensors").write_bytes(leftover)
        else:
            store._s3.put_object(Bucket=store.bucket, Key=store._blob_key(bundle_id), Body=leftover)
        assert store.put(data).bundle_id == bundle_id
        assert make_store().read(bundle_id) == data  # a fresh handle, past any cache: the whole bundle
        store.deactivate("cars")
        store.purge("cars")


def test_a_purge_that_keeps_every_version_writes_no_generation(make_store, backbone):
    """An outside check: purging again a task whose versions other tasks need published a new generation each time,
    and every server built its bank again."""
    from model_store.loader import BankLoader

    store = make_store()
    store.put(random_bundle(empty_bank(backbone), "a", seed=1))
    store.put(random_bundle(BankLoader(store, backbone).load(), "b", seed=2))  # trained on a's experts
    store.deactivate("a")
    assert store.purge("a") == 0 and [v.version for v in store.task("a").versions] == [1]  # b needs it
    before = store.generation()
    assert store.purge("a") == 0 and make_store().generation() == before


def test_a_purge_or_clean_of_a_newer_releases_store_deletes_nothing(make_store, backbone, bundles):
    """A review: a purge that kept every version skipped the format check, then deleted the blobs this release saw
    no version name (a newer format may name them); `store clean` deleted them too."""
    from model_store.errors import StoreTooNew
    from model_store.loader import BankLoader

    store = make_store()
    store.put(random_bundle(empty_bank(backbone), "a", seed=1))
    store.put(random_bundle(BankLoader(store, backbone).load(), "b", seed=2))  # b needs a's experts
    store.deactivate("a")
    stray = bundles[1]
    newer = {**store.index().to_json(), "format": 99}
    if isinstance(store, LocalStore):
        store.index_path.write_text(json.dumps(newer))
        (store.blobs / f"{read_bundle(stray).id}.safetensors").write_bytes(stray)
    else:
        store._s3.put_object(Bucket=store.bucket, Key=store._key("index.json"), Body=json.dumps(newer).encode())
        store._s3.put_object(Bucket=store.bucket, Key=store._blob_key(read_bundle(stray).id), Body=stray)
    before = blob_ids(store)
    other = make_store()
    with pytest.raises(StoreTooNew):
        other.purge("a")
    if isinstance(other, LocalStore):
        with pytest.raises(StoreTooNew):
            other.sweep()
    assert blob_ids(store) == before and len(before) == 3


def test_s3_a_put_meeting_a_stopped_purges_deletion_says_when_to_try_again(make_store, bundles):
    """An outside check: a purge killed between listing a blob under `deleting` and deleting it left every upload of
    that bundle waiting 30 s, then "try again" with Retry-After 1, for 5 minutes. An entry older than a live purge
    takes is answered at once, with the seconds until the next change finishes it; past that, the put lands."""
    import time

    from model_store.bundle import read_bundle
    from model_store.errors import StoreUnavailable

    store = make_store()
    if isinstance(store, LocalStore):
        pytest.skip("an object store's purge")
    bundle_id = read_bundle(bundles[1]).id
    store.put(bundles[1])

    def stopped_purge(seconds_ago: float) -> None:  # the purge published its index, then died
        index = {**store.index().to_json(), "tasks": {}, "deleting": {bundle_id: time.time() - seconds_ago}}
        store._s3.put_object(Bucket=store.bucket, Key=store._key("index.json"), Body=json.dumps(index).encode())

    stopped_purge(100)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"in a purge's deletion for 10\d s: that purge stopped") as e:
        make_store().put(bundles[1])
    assert time.monotonic() - started < 5 and 190 <= e.value.retry_after <= 200
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from service.errors import install_handlers

    app = FastAPI()
    install_handlers(app)

    @app.get("/x")
    def x() -> None:
        raise e.value

    answer = TestClient(app).get("/x")  # the API's Retry-After is the error's own
    assert answer.status_code == 503 and answer.headers["retry-after"] == str(e.value.retry_after)
    stopped_purge(400)
    assert make_store().put(bundles[1]).version == 1  # the deletion finished, the blob written again


def test_s3_failures_no_retry_heals_say_what_to_check(s3_env):
    """An outside check: wrong credentials were "could not read the index (SignatureDoesNotMatch)", and nothing
    more; a missing bucket, the same. Each now says what an operator should look at."""
    from botocore.exceptions import ClientError

    from model_store.errors import StoreUnavailable

    store = open_store(f"s3://{s3_env}/bank")
    for code, said in (
        ("SignatureDoesNotMatch", "check the credentials this server was given (AWS_ACCESS_KEY_ID"),
        ("AccessDenied", "these credentials may not read it"),
        ("NoSuchBucket", "create the bucket, or correct the store's s3://BUCKET/prefix"),
    ):
        error = ClientError({"Error": {"Code": code, "Message": "no"}}, "GetObject")
        refused = store._unavailable("read the index", error)
        assert isinstance(refused, StoreUnavailable) and f"({code}): {said}" in str(refused), refused
    timeout = store._unavailable("read the index", TimeoutError("slow"))
    assert str(timeout).endswith("could not read the index (TimeoutError)")  # a retry may heal this one


def test_store_clean_deletes_blobs_no_version_names_on_both_backends(
    make_store, bundles, capsys, monkeypatch, backbone
):
    """An outside check: on s3:// `store clean` refused, and a blob a killed writer left could go only with a purge
    of some task an hour later. On S3 it deletes those written over STRAY_SECONDS ago (newer: a put in flight)."""
    from clipbank.cli import main
    from model_store import store_s3

    store = make_store()
    kept = store.put(bundles[1])
    from model_store.digest import bytes_digest

    stray = random_bundle(empty_bank(backbone), "boats", seed=5)  # a blob no index names
    name = bytes_digest(stray)
    if isinstance(store, LocalStore):
        (store.blobs / f"{name}.safetensors").write_bytes(stray)
    else:
        store._s3.put_object(Bucket=store.bucket, Key=store._blob_key(name), Body=stray)
        assert main(["store", "--store", store.location, "clean"]) == 0  # written now: maybe a put in flight
        assert "0 blob(s) no version names (written over an hour ago" in capsys.readouterr().out
        monkeypatch.setattr(store_s3, "STRAY_SECONDS", -1.0)
    assert main(["store", "--store", store.location, "clean"]) == 0
    assert "1 blob(s) no version names" in capsys.readouterr().out
    assert blob_ids(store) == {kept.bundle_id} and store.read(kept.bundle_id)

"""Which drivers hold the cluster's clipbank application, so that only the last one to stop deletes it."""

from __future__ import annotations

import pytest

from service import ray_owners


class FakeKV:
    """Ray's internal key-value store (atomic single-key calls), in memory."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def _internal_kv_put(self, key, value, overwrite=True, *, namespace=None):
        if key in self.data and not overwrite:
            return True
        self.data[key] = value
        return False

    def _internal_kv_get(self, key, *, namespace=None):
        return self.data.get(key)

    def _internal_kv_del(self, key, *, namespace=None):
        return int(self.data.pop(key, None) is not None)

    def _internal_kv_list(self, prefix, *, namespace=None):
        return [k for k in self.data if k.startswith(prefix)]


@pytest.fixture
def ray_state(monkeypatch):
    """The fake store, this driver's job (`job`) and the ended jobs (`ended`)."""
    state = {"kv": FakeKV(), "job": "01000000", "ended": set()}
    monkeypatch.setattr(ray_owners, "_kv", lambda: state["kv"])
    monkeypatch.setattr(ray_owners, "_this_job", lambda: state["job"])
    monkeypatch.setattr(ray_owners, "_ended_jobs", lambda: set(state["ended"]))
    return state


def test_the_newer_driver_stopped_first_leaves_the_older_ones_application_serving(ray_state):
    """An outside check's: a scale-up (a second driver) given up while its replicas waited for CPUs deleted the
    application the first driver still ran, and every request got a 404."""
    first = ray_owners.claim()
    ray_state["job"] = "02000000"
    second = ray_owners.claim()
    assert ray_owners.release(second) == 1  # the first still runs: not deleted
    assert ray_owners.release(first) == 0  # the last to stop deletes it


def test_the_rolling_change_of_replicas_still_ends_with_the_last_driver_deleting(ray_state):
    first = ray_owners.claim()
    ray_state["job"] = "02000000"
    second = ray_owners.claim()
    assert ray_owners.release(first) == 1 and ray_owners.release(second) == 0


def test_two_drivers_stopping_at_once_do_not_both_leave_it(ray_state, monkeypatch):
    """The review's: a list read and written whole lost one of two updates made at once. Each holder is a key of
    its own now; here the second driver's release runs between the first one's removal and its count."""
    first = ray_owners.claim()
    ray_state["job"] = "02000000"
    second = ray_owners.claim()
    kv, counted = ray_state["kv"], []
    delete = kv._internal_kv_del

    def interleaved(key, *, namespace=None):
        done = delete(key, namespace=namespace)
        if key.endswith(first.encode()) and not counted:
            counted.append(ray_owners.release(second))  # the other driver stops meanwhile
        return done

    monkeypatch.setattr(kv, "_internal_kv_del", interleaved)
    assert sorted([ray_owners.release(first), *counted]) == [0, 0]  # both may delete: neither leaves it serving


def test_a_killed_drivers_holder_and_an_old_single_mark_do_not_count(ray_state):
    ray_owners.claim()  # then killed with SIGKILL: its job ends, its key stays
    ray_state["kv"].data[ray_owners.OLD_KEY] = b"0123abcd"  # an older clipbank's mark
    ray_state["ended"] = {"01000000"}
    ray_state["job"] = "02000000"
    mine = ray_owners.claim()
    assert ray_owners.OLD_KEY not in ray_state["kv"].data  # taken over, as a newer deploy always did
    assert ray_owners.release(mine) == 0 and ray_state["kv"].data == {}


def test_a_store_that_cannot_say_leaves_the_application_serving(monkeypatch):
    def unreachable():
        raise ConnectionError("the driver lost its cluster")

    monkeypatch.setattr(ray_owners, "_kv", unreachable)
    assert ray_owners.release("mark") is None


@pytest.mark.parametrize(
    ("local", "others", "deleted"),
    [(False, 1, False), (False, 0, True), (False, None, False), (True, 1, True)],
)
def test_stopping_deletes_the_application_only_when_no_other_driver_holds_it(monkeypatch, local, others, deleted):
    ray = pytest.importorskip("ray")
    from ray import serve

    from service import ray_engine

    calls: list[str] = []
    monkeypatch.setattr(ray_engine, "release", lambda mark: others)
    monkeypatch.setattr(serve, "delete", lambda name: calls.append(f"delete {name}"))
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("serve down"))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray down"))
    ray_engine._close(local, "mark")
    assert (f"delete {ray_engine.APP_NAME}" in calls) == deleted and calls[-1] == "ray down"

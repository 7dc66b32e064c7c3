"""Which drivers hold the cluster's clipbank application, so that only the last one to stop deletes it."""

from __future__ import annotations

import pytest

from service import ray_owners


@pytest.fixture
def kv(monkeypatch):
    """Ray's key-value store and job table, in memory: `kv["value"]`, `kv["job"]` (this driver's), `kv["ended"]`."""
    state = {"value": None, "job": "01000000", "ended": set()}
    monkeypatch.setattr(ray_owners, "_read", lambda: ray_owners.parse_holders(state["value"]))
    monkeypatch.setattr(ray_owners, "_write", lambda h: state.update(value=ray_owners.json.dumps(h).encode()))
    monkeypatch.setattr(ray_owners, "_this_job", lambda: state["job"])
    monkeypatch.setattr(ray_owners, "_ended_jobs", lambda: set(state["ended"]))
    return state


def test_the_newer_driver_stopped_first_leaves_the_older_ones_application_serving(kv):
    """An outside check's: a scale-up (a second driver) given up while its replicas waited for CPUs deleted the
    application the first driver still ran, and every request got a 404."""
    first = ray_owners.claim()
    kv["job"] = "02000000"
    second = ray_owners.claim()
    assert ray_owners.release(second) == 1  # the first still runs: not deleted
    assert ray_owners.release(first) == 0  # the last to stop deletes it


def test_the_rolling_change_of_replicas_still_ends_with_the_last_driver_deleting(kv):
    first = ray_owners.claim()
    kv["job"] = "02000000"
    second = ray_owners.claim()
    assert ray_owners.release(first) == 1 and ray_owners.release(second) == 0


def test_a_driver_whose_job_ended_no_longer_holds_it_and_an_old_single_mark_does(kv):
    first = ray_owners.claim()  # then killed with SIGKILL: its job ends, its mark stays
    kv["ended"] = {"01000000"}
    kv["job"] = "02000000"
    assert ray_owners.release(ray_owners.claim()) == 0
    kv["value"] = b"0123abcd"  # an older clipbank's mark: its driver may run, so it is kept
    assert ray_owners.release(ray_owners.claim()) == 1
    assert ray_owners.parse_holders(kv["value"]) == [{"mark": "0123abcd", "job": None}]
    assert first not in kv["value"].decode()


def test_a_store_that_cannot_say_leaves_the_application_serving(monkeypatch):
    def unreachable():
        raise ConnectionError("the driver lost its cluster")

    monkeypatch.setattr(ray_owners, "_read", unreachable)
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

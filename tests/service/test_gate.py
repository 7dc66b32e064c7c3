"""The interference gate: a version that would take other tasks' or zero-shot traffic is refused with 409 and a
report that names each offended task; force=true lands it (logged, counted); a normal version passes and its
report is kept beside it in the store."""

from __future__ import annotations

import logging

import pytest

from service.request_ids import RequestIdFilter
from tests.helpers import over_broad

from .conftest import AUTH, running_app

pytestmark = pytest.mark.anyio
DEFAULTS = {"gate_max_stolen": 0.02, "gate_max_zero_shot": 0.05}  # ServeConfig's


def _metric(text: str, name: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


async def _push_textures(c, textures: bytes) -> dict:
    """textures, trained by the session with the default (hybrid) selector, passes the gate on its own."""
    r = await c.post("/tasks", files={"bundle": ("t", textures)}, headers=AUTH)
    assert r.status_code == 201 and r.json()["gate"]["passed"], r.text
    assert r.json()["gate"]["zero_shot_captured"] <= DEFAULTS["gate_max_zero_shot"]
    return r.json()


async def test_an_over_broad_version_is_refused_naming_each_task_and_force_lands_it(
    tmp_path, backbone, bundles, caplog
):
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.INFO, logger="clipbank.service")
    async with running_app(tmp_path, backbone, **DEFAULTS) as c:
        await _push_textures(c, bundles["textures"])
        broad = over_broad(bundles["glyphs"])
        r = await c.post("/tasks", files={"bundle": ("g", broad)}, headers=AUTH)
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "interference" and "task 'textures'" in error["message"]
        report = error["details"]
        assert report["stolen"]["textures"] > 0.9 and report["zero_shot_captured"] > 0.9 and not report["passed"]
        listed = (await c.get("/tasks", headers=AUTH)).json()
        assert [t["task"] for t in listed["tasks"]] == ["textures"]  # nothing stored, nothing swapped
        assert _metric((await c.get("/metrics")).text, "clipbank_gate_refusals_total") == 1
        # a refusal is no failed swap: an alert on swap failures fired on every refused upload
        assert _metric((await c.get("/metrics")).text, "clipbank_swap_failures_total") == 0

        forced = {**AUTH, "X-Request-ID": "r-force"}
        r = await c.post("/tasks", params={"force": "true"}, files={"bundle": ("g", broad)}, headers=forced)
        assert r.status_code == 201 and r.json()["gate"]["passed"] is False
        # an outside check: the override's line (run on the compute thread) named no request, and no line named
        # the version that went live
        lines = {r.getMessage().split(":")[0]: r.request_id for r in caplog.records if r.name == "clipbank.service"}
        assert lines["gate overridden (force) for glyphs v1"] == "r-force", lines
        assert lines["stored"] == "r-force", lines
        stored = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stored: ")]
        assert stored[-1] == f"stored: version 1 of glyphs (active, force), generation {r.json()['generation']}"
        again = await c.post("/tasks/glyphs/activate", json={"version": 1}, headers=AUTH)  # active: nothing stored
        assert again.status_code == 200 and again.json()["generation"] == r.json()["generation"], again.text
        assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("stored: ")] == stored
        info = (await c.get("/tasks/glyphs", headers=AUTH)).json()
        assert info["serving"] and info["versions"][0]["gate"]["stolen"]["textures"] > 0.9  # kept in the store
        assert _metric((await c.get("/metrics")).text, "clipbank_gate_overrides_total") == 1

        for params in ({}, {"activate": "false"}):  # the same version again: why it is refused, not the gate's report
            r = await c.post("/tasks", params=params, files={"bundle": ("g", broad)}, headers=AUTH)
            assert r.status_code == 409 and r.json()["error"]["code"] == "version_conflict", r.text
        assert _metric((await c.get("/metrics")).text, "clipbank_gate_refusals_total") == 1


async def test_activation_is_gated_too(tmp_path, backbone, bundles):
    async with running_app(tmp_path, backbone, **DEFAULTS) as c:
        await _push_textures(c, bundles["textures"])
        broad = over_broad(bundles["glyphs"])
        stored = {"activate": "false"}
        r = await c.post("/tasks", params=stored, files={"bundle": ("g", broad)}, headers=AUTH)
        assert r.status_code == 409  # stored inactive or not, it is checked as if activated
        assert "task 'glyphs' v1 was not stored: " in r.json()["error"]["message"]
        r = await c.post("/tasks", params={**stored, "force": "1"}, files={"bundle": ("g", broad)}, headers=AUTH)
        assert r.status_code == 201
        r = await c.post("/tasks/glyphs/activate", json={"version": 1}, headers=AUTH)
        assert r.status_code == 409 and r.json()["error"]["details"]["stolen"]["textures"] > 0.9
        message = r.json()["error"]["message"]
        assert "task 'glyphs' v1 was not activated: " in message and "activate it anyway with force=true" in message
        # an outside check: it blamed tasks activated since, where the version had failed as it was stored (forced)
        assert "It failed the gate when it was last checked too" in message and "activated since" not in message
        info = (await c.get("/tasks/glyphs", headers=AUTH)).json()
        assert not info["serving"] and "checked_on" not in info["versions"][0]["gate"]  # a refusal keeps the upload's
        r = await c.post("/tasks/glyphs/activate", params={"force": "true"}, json={"version": 1}, headers=AUTH)
        assert r.status_code == 200 and r.json()["serving"]
        gate = r.json()["gate"]  # what was forced past, in the answer
        assert not gate["passed"] and gate["stolen"]["textures"] > 0.9 and gate["version"] == 1, gate
        # and kept beside the version, in place of the upload's (an outside check: GET showed the upload's only)
        stored = (await c.get("/tasks/glyphs", headers=AUTH)).json()["versions"][0]["gate"]
        assert stored.pop("checked_on") == "activation" and stored.pop("checked_at") and stored == gate, stored
        again = await c.post("/tasks/glyphs/activate", json={"version": 1}, headers=AUTH)  # active already
        assert again.status_code == 200 and again.json()["gate"] is None


async def test_a_normal_version_passes_and_its_report_is_stored(tmp_path, backbone, bundles):
    async with running_app(tmp_path, backbone, **DEFAULTS) as c:
        await _push_textures(c, bundles["textures"])
        r = await c.post("/tasks", files={"bundle": ("g", bundles["glyphs"])}, headers=AUTH)
        assert r.status_code == 201, r.text
        report = r.json()["gate"]
        assert report["passed"] and report["self_claim"] >= 0.9 and set(report["stolen"]) == {"textures"}, report
        assert report["stolen"]["textures"] <= 0.02 and report["zero_shot_captured"] <= 0.05
        stored = (await c.get("/tasks/glyphs", headers=AUTH)).json()["versions"][0]["gate"]
        assert stored == report


async def test_images_the_task_takes_already_are_not_taken_again(tmp_path, backbone, bundles):
    """An outside check: a task whose images another task's serving version had all along blocked that task's
    rollback (409, "would take 98% of ..."). A new version of a task takes from others only what its serving
    version does not, when that version passed its last check unforced; what it keeps is `already_taken`. With the
    task not serving, or its serving version forced past the gate (a review), all of it counts."""
    from tests.helpers import with_version

    broad = over_broad(bundles["glyphs"])
    loose = {"gate_max_stolen": 1.0, "gate_max_zero_shot": 1.0}  # a server whose limits let v1 pass unforced
    async with running_app(tmp_path, backbone, **loose) as c:
        await _push_textures(c, bundles["textures"])
        r = await c.post("/tasks", files={"bundle": ("g", broad)}, headers=AUTH)
        assert r.status_code == 201 and r.json()["gate"]["passed"] and r.json()["gate"]["stolen"]["textures"] > 0.9
    async with running_app(tmp_path, backbone, **DEFAULTS) as c:  # the same store, the default limits
        r = await c.post("/tasks", files={"bundle": ("g", with_version(broad, 2))}, headers=AUTH)
        assert r.status_code == 201, r.text  # v2 takes nothing v1 did not have
        gate = r.json()["gate"]
        assert gate["passed"] and gate["stolen"]["textures"] == 0 and gate["already_taken"]["textures"] > 0.9, gate
        assert gate["zero_shot_already"] > 0.9 and gate["zero_shot_captured"] == 0, gate
        r = await c.post("/tasks/glyphs/activate", json={"version": 1}, headers=AUTH)  # the rollback
        assert r.status_code == 200 and r.json()["active_version"] == 1, r.text
        assert (await c.delete("/tasks/glyphs", headers=AUTH)).status_code == 200
        r = await c.post("/tasks/glyphs/activate", json={"version": 2}, headers=AUTH)  # nothing held: all counted
        assert r.status_code == 409 and r.json()["error"]["details"]["stolen"]["textures"] > 0.9, r.text
        assert r.json()["error"]["details"]["already_taken"] == {}
        r = await c.post("/tasks/glyphs/activate", params={"force": "1"}, json={"version": 2}, headers=AUTH)
        assert r.status_code == 200  # forced: its report, kept, failed
        r = await c.post("/tasks", files={"bundle": ("g", with_version(broad, 3))}, headers=AUTH)
        assert r.status_code == 409, r.text  # a forced version is no licence for the next
        assert r.json()["error"]["details"]["stolen"]["textures"] > 0.9


async def test_the_report_says_where_a_versions_own_images_go(tmp_path, backbone, bundles):
    """An outside check: a task trained on images another task claims got 0% of its own probes, and nothing said
    where they went. `own_routes` names the tasks (or zero-shot) that take them."""
    async with running_app(tmp_path, backbone, **DEFAULTS) as c:
        broad = over_broad(bundles["textures"])
        r = await c.post("/tasks", params={"force": "true"}, files={"bundle": ("t", broad)}, headers=AUTH)
        assert r.status_code == 201
        r = await c.post("/tasks", params={"force": "true"}, files={"bundle": ("g", bundles["glyphs"])}, headers=AUTH)
        gate = r.json()["gate"]
        assert gate["self_claim"] < 0.5 and gate["own_routes"].get("textures", 0) > 0.5, gate
        assert abs(gate["self_claim"] + sum(gate["own_routes"].values()) - 1) < 0.01, gate

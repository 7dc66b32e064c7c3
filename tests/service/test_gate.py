"""The interference gate: a version that would take other tasks' or zero-shot traffic is refused with 409 and a
report that names each offended task; force=true lands it (logged, counted); a normal version passes and its
report is kept beside it in the store."""

from __future__ import annotations

import pytest

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


async def test_an_over_broad_version_is_refused_naming_each_task_and_force_lands_it(tmp_path, backbone, bundles):
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

        r = await c.post("/tasks", params={"force": "true"}, files={"bundle": ("g", broad)}, headers=AUTH)
        assert r.status_code == 201 and r.json()["gate"]["passed"] is False
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
        assert "It failed the gate when it was stored too" in message and "activated since" not in message
        assert not (await c.get("/tasks/glyphs", headers=AUTH)).json()["serving"]
        r = await c.post("/tasks/glyphs/activate", params={"force": "true"}, json={"version": 1}, headers=AUTH)
        assert r.status_code == 200 and r.json()["serving"]
        gate = r.json()["gate"]  # what was forced past, in the answer
        assert not gate["passed"] and gate["stolen"]["textures"] > 0.9 and gate["version"] == 1, gate
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

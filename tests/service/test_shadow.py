"""Shadow activation: a version in shadow scores live traffic without answering any request, reports what it would
take and from where, and what it reports is what it does once promoted on the same images."""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks.samples import domain_pngs
from model_store.modes import PER_IMAGE, PER_REQUEST
from tests.helpers import over_broad, with_version

from .conftest import AUTH, running_app
from .test_gate import DEFAULTS

pytestmark = pytest.mark.anyio


def _files(*domains: tuple[str, int]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("images", (f"{name}{i}.png", data)) for name, n in domains for i, data in enumerate(domain_pngs(name, n))]


MIXED = _files(("glyphs", 10), ("textures", 10), ("shapes", 8))
# zero-shot images need something to choose among; a label of each task's, or it may claim none (label-aware routing)
LABELS = {"labels": ["red", "blue", "letter a", "stripes"]}


async def _routes(c, route: str = PER_IMAGE) -> list[str | None]:
    r = await c.post("/classify", files=MIXED, data={**LABELS, "route": route})
    assert r.status_code == 200, r.text
    return [res["route"]["task"] for res in r.json()["results"]]


async def test_shadow_claims_are_what_promotion_does_on_the_same_images(tmp_path, backbone, bundles):
    async with running_app(tmp_path, backbone) as c:
        assert (await c.post("/tasks", files={"bundle": ("t", bundles["textures"])}, headers=AUTH)).status_code == 201
        r = await c.post("/tasks", params={"mode": "shadow"}, files={"bundle": ("g", bundles["glyphs"])}, headers=AUTH)
        assert r.status_code == 201 and r.json()["gate"]["self_claim"] is not None, r.text
        info = (await c.get("/tasks/glyphs", headers=AUTH)).json()
        assert info["active_version"] is None and info["shadow_version"] == 1 and not info["serving"]

        before = await _routes(c) + await _routes(c, PER_REQUEST)
        assert "glyphs" not in before  # a shadow answers nothing
        shadow = (await c.get("/tasks/glyphs/shadow", headers=AUTH)).json()
        assert shadow["version"] == 1 and shadow["images"] == len(before) == 2 * len(MIXED)
        assert sum(shadow["score_histogram"]["counts"]) == shadow["images"]
        metrics = (await c.get("/metrics")).text
        assert f'clipbank_shadow_images_total{{task="glyphs"}} {float(2 * len(MIXED))}' in metrics

        r = await c.post("/tasks/glyphs/activate", json={"version": 1}, headers=AUTH)
        assert r.status_code == 200 and r.json()["shadow_version"] is None  # promoted: out of the shadow
        after = await _routes(c) + await _routes(c, PER_REQUEST)
        taken = Counter(b or "zero-shot" for b, a in zip(before, after, strict=True) if a == "glyphs")
        assert sum(taken.values()) >= 8, after  # glyphs claims most of its own images
        assert shadow["would_claim"] == sum(taken.values()) and shadow["taken_from"] == dict(taken), (shadow, taken)
        assert shadow["replica"] == c.app.state.service.replica  # whose traffic it counted
        assert all(a == b for b, a in zip(before, after, strict=True) if a != "glyphs")  # nothing else moved

        r = await c.get("/tasks/glyphs/shadow", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_shadow"
        metrics = (await c.get("/metrics")).text  # promoted: its shadow series are gone, its claims counted
        assert 'clipbank_shadow_images_total{task="glyphs"}' not in metrics
        assert 'clipbank_claims_total{route="glyphs"}' in metrics and "clipbank_route_score_bucket" in metrics


async def test_a_new_version_in_shadow_beside_the_active_one(tmp_path, backbone, bundles):
    """v2 in shadow replaces v1's column in what it would do; an over-broad shadow is stored (the gate only
    reports), changes no answer, shows what it would take, and is refused on promotion."""
    async with running_app(tmp_path, backbone, **DEFAULTS) as c:
        for name in ("textures", "glyphs"):
            r = await c.post("/tasks", params={"force": "true"}, files={"bundle": ("b", bundles[name])}, headers=AUTH)
            assert r.status_code == 201, r.text
        before = await _routes(c)
        broad = with_version(over_broad(bundles["glyphs"]), 2)
        r = await c.post("/tasks", params={"mode": "shadow"}, files={"bundle": ("g", broad)}, headers=AUTH)
        assert r.status_code == 201 and r.json()["gate"]["passed"] is False
        assert await _routes(c) == before  # what is served did not change
        shadow = (await c.get("/tasks/glyphs/shadow", headers=AUTH)).json()
        assert shadow["version"] == 2 and shadow["would_claim"] == len(MIXED)  # it would take every image...
        assert shadow["taken_from"] == dict(Counter(b or "zero-shot" for b in before))  # ...from where they go now
        r = await c.post("/tasks/glyphs/activate", json={"version": 2}, headers=AUTH)
        assert r.status_code == 409 and r.json()["error"]["code"] == "interference"

        assert 'clipbank_shadow_images_total{task="glyphs"}' in (await c.get("/metrics")).text
        r = await c.delete("/tasks/glyphs/shadow", headers=AUTH)
        assert r.status_code == 200 and r.json()["shadow_version"] is None and r.json()["active_version"] == 1
        assert 'clipbank_shadow_images_total{task="glyphs"}' not in (await c.get("/metrics")).text  # series gone
        assert (await c.get("/tasks/glyphs/shadow", headers=AUTH)).status_code == 404
        r = await c.post("/tasks/glyphs/shadow", json={"version": 2}, headers=AUTH)  # back in shadow: counts anew
        assert r.status_code == 200 and r.json()["shadow_version"] == 2
        assert r.json()["gate"]["passed"] is False and r.json()["gate"]["offences"]  # reported, as on an upload
        kept = next(v["gate"] for v in r.json()["versions"] if v["version"] == 2)  # and kept beside the version
        assert kept["checked_on"] == "shadow" and kept["offences"] == r.json()["gate"]["offences"], kept
        assert (await c.get("/tasks/glyphs/shadow", headers=AUTH)).json()["images"] == 0
        generation = r.headers["X-Clipbank-Generation"]
        again = await c.post("/tasks/glyphs/shadow", json={"version": 2}, headers=AUTH)  # in shadow already
        assert again.status_code == 200 and again.json()["shadow_version"] == 2 and again.json()["gate"] is None
        assert again.headers["X-Clipbank-Generation"] == generation  # nothing written, no bank rebuilt anywhere
        await _routes(c)
        counted = (await c.get("/tasks/glyphs/shadow", headers=AUTH)).json()
        assert counted["images"] > 0 and counted["taken_from"].get("glyphs"), counted
        # an outside check's: with glyphs no longer served, the counts went on, against two banks mixed
        r = await c.delete("/tasks/glyphs", headers=AUTH)
        assert r.status_code == 200 and r.json()["was_active"] and r.json()["shadow_version"] == 2, r.text
        again = (await c.delete("/tasks/glyphs", headers=AUTH)).json()  # said, where it was a silent 200
        assert (again["was_active"], again["shadow_version"]) == (False, 2), again
        restarted = (await c.get("/tasks/glyphs/shadow", headers=AUTH)).json()
        assert (restarted["images"], restarted["taken_from"]) == (0, {}), restarted
        await _routes(c)
        assert "glyphs" not in (await c.get("/tasks/glyphs/shadow", headers=AUTH)).json()["taken_from"]


async def test_shadow_errors_are_clear_4xx(tmp_path, backbone, bundles):
    async with running_app(tmp_path, backbone) as c:
        textures = {"bundle": ("t", bundles["textures"])}
        for params in ({"mode": "shadow", "activate": "true"}, {"mode": "later"}):
            r = await c.post("/tasks", params=params, files=textures, headers=AUTH)
            assert r.status_code == 422, (params, r.text)
        # both spellings, as the client sends them (a server older than `mode` reads `activate`)
        r = await c.post("/tasks", params={"mode": "inactive", "activate": "false"}, files=textures, headers=AUTH)
        assert r.status_code == 201 and (await c.get("/tasks/textures", headers=AUTH)).json()["active_version"] is None
        assert (await c.post("/tasks/textures/activate", json={"version": 1}, headers=AUTH)).status_code == 200
        cases = [
            ("GET", "/tasks/nope/shadow", {}, 404, "task_not_found"),
            ("GET", "/tasks/textures/shadow", {}, 404, "no_shadow"),
            ("DELETE", "/tasks/textures/shadow", {}, 404, "no_shadow"),
            ("POST", "/tasks/textures/shadow", {"json": {"version": 1}}, 409, "shadow_conflict"),
            ("POST", "/tasks/textures/shadow", {"json": {"version": 7}}, 404, "version_not_found"),
            ("POST", "/tasks/textures/shadow", {"json": {"version": "1"}}, 422, None),
        ]
        for method, path, kwargs, status, code in cases:
            r = await c.request(method, path, headers=AUTH, **kwargs)
            assert r.status_code == status, (method, path, r.text)
            assert code is None or r.json()["error"]["code"] == code, r.text
        for method, path, kwargs, _, _ in cases:
            assert (await c.request(method, path, **kwargs)).status_code == 401


def test_a_score_that_is_not_finite_is_counted_but_kept_out_of_the_metrics_sum():
    """A security check's: a version in shadow whose selector scored inf left `clipbank_shadow_score_sum` at +Inf."""
    import torch

    from model_store.shadow import ShadowSeen
    from service.metrics import Metrics
    from service.shadow import ShadowMonitor, ShadowStats

    metrics = Metrics()
    monitor = ShadowMonitor(metrics)
    monitor._stats["cars"] = ShadowStats("cars", 2, "b2")
    scores = torch.tensor([0.5, float("inf"), float("nan"), 2.0])
    seen = ShadowSeen("cars", 2, "b2", scores, scores <= 1, ("cars", None, None, "cars"))
    monitor.record([seen])
    assert monitor.stats("cars")["images"] == 4 and monitor.stats("cars")["would_claim"] == 1
    total = sum(s.value for m in metrics.shadow_score.collect() for s in m.samples if s.name.endswith("_sum"))
    count = sum(s.value for m in metrics.shadow_score.collect() for s in m.samples if s.name.endswith("_count"))
    assert total == 2.5 and count == 2


def test_figures_that_restart_within_a_second_get_a_new_since():
    """An outside check: an activation right after a version entered the shadow restarted its figures (images 12
    -> 0) but `since` read the same: it was to the second."""
    import time

    from model_store.bank import ShadowEntry
    from service.metrics import Metrics
    from service.shadow import ShadowMonitor

    monitor = ShadowMonitor(Metrics())
    entry = ShadowEntry("digits", 3, "b3", None, frozenset())
    monitor.follow([entry], {"digits": "b1"})
    first = monitor.stats("digits")["since"]
    time.sleep(0.01)
    monitor.follow([entry], {"digits": "b2"})  # the task's served version changed: the figures restart
    assert monitor.stats("digits")["since"] > first

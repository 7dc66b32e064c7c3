"""Read your own writes: X-Clipbank-Generation on every answer, X-Min-Generation honoured or refused with a 503,
and POST /tasks?wait=all on a single server (it answers for itself)."""

from __future__ import annotations

import pytest

from model_store.bank import empty_bank
from tests.helpers import random_bundle
from tests.service.conftest import AUTH, running_app
from tests.service.images import colour

pytestmark = pytest.mark.anyio


def classify_form() -> dict:
    return {"files": [("images", ("x.png", colour("red")))], "data": {"labels": ["a", "b"]}}


async def test_every_answer_names_its_generation_and_replica(tmp_path, backbone):
    async with running_app(tmp_path, backbone) as client:
        ready = await client.get("/readyz")
        assert ready.headers["X-Clipbank-Generation"] == "0" and ready.headers["X-Clipbank-Replica"]
        pushed = await client.post(
            "/tasks", params={"wait": "all"}, files={"bundle": ("b", random_bundle(empty_bank(backbone), "a", 1))},
            headers=AUTH,
        )  # fmt: skip
        assert pushed.status_code == 201 and pushed.headers["X-Clipbank-Generation"] == "1"
        assert pushed.json()["replicas"] == {ready.headers["X-Clipbank-Replica"]: 1}
        answer = await client.post("/classify", **classify_form())
        assert answer.headers["X-Clipbank-Generation"] == str(answer.json()["timing"]["generation"]) == "1"
        missing = await client.get("/tasks/nope", headers=AUTH)
        assert missing.status_code == 404 and missing.headers["X-Clipbank-Generation"] == "1"
        pushed = await client.post(  # v2, then every change answers with the generation it made, as a push does
            "/tasks", params={"mode": "inactive"}, headers=AUTH,
            files={"bundle": ("b", random_bundle(empty_bank(backbone), "a", 2, version=2))},
        )  # fmt: skip
        assert pushed.status_code == 201 and pushed.json()["generation"] == 2
        changes = [
            client.post("/tasks/a/shadow", json={"version": 2}, headers=AUTH),
            client.delete("/tasks/a/shadow", headers=AUTH),
            client.post("/tasks/a/activate", json={"version": 2}, headers=AUTH),
        ]
        for want, change in enumerate(changes, start=3):
            r = await change
            assert r.status_code == 200 and r.json()["generation"] == want, r.text
            assert r.headers["X-Clipbank-Generation"] == str(want)


async def test_the_openapi_document_declares_the_generation_headers(tmp_path, backbone):
    """Generated clients learn of X-Min-Generation and of the answers' headers from the schema."""
    async with running_app(tmp_path, backbone) as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
        for path, method in [("/classify", "post"), ("/tasks", "get"), ("/tasks/{task}", "get"), ("/readyz", "get")]:
            op = paths[path][method]
            (param,) = [p for p in op["parameters"] if p["name"] == "X-Min-Generation"]
            assert param["in"] == "header" and not param["required"] and param["schema"]["minimum"] == 0
            for status, response in op["responses"].items():
                assert {"X-Clipbank-Generation", "X-Clipbank-Replica"} <= set(response["headers"]), (path, status)
        for path in ("/healthz", "/metrics"):  # answered whatever it asks
            assert "X-Min-Generation" not in {p["name"] for p in paths[path]["get"]["parameters"]}, path


async def test_min_generation_is_met_after_reading_the_store_or_refused(tmp_path, backbone):
    """A second server writes the store; this one has not polled yet (poll_seconds is long): a request asking
    for the new generation makes it read the store first."""
    from model_store.store import open_store

    async with running_app(tmp_path, backbone, poll_seconds=3600) as client:
        put = open_store(tmp_path / "store").put(random_bundle(empty_bank(backbone), "a", seed=1))
        caught_up = await client.post("/classify", headers={"X-Min-Generation": str(put.generation)}, **classify_form())
        assert caught_up.status_code == 200 and caught_up.headers["X-Clipbank-Generation"] == str(put.generation)
        ahead = await client.post("/classify", headers={"X-Min-Generation": "99"}, **classify_form())
        assert ahead.status_code == 503 and ahead.headers["Retry-After"] == "1"
        assert ahead.json()["error"]["code"] == "stale_replica"
        assert ahead.json()["error"]["details"] == {"generation": put.generation, "wanted": 99}
        assert ahead.headers["X-Clipbank-Generation"] == str(put.generation)  # which replica is behind, and where
        assert ahead.headers["X-Clipbank-Replica"] == caught_up.headers["X-Clipbank-Replica"]
        for bad in ("-1", "soon", "9" * 40):
            refused = await client.get("/readyz", headers={"X-Min-Generation": bad})
            assert refused.status_code == 400 and "X-Min-Generation" in refused.json()["error"]["message"]
        metrics = (await client.get("/metrics")).text  # counted under their routes, not as "unmatched" paths
        assert 'clipbank_requests_total{endpoint="/classify",method="POST",status="503"} 1.0' in metrics
        assert 'clipbank_requests_total{endpoint="/readyz",method="GET",status="400"} 3.0' in metrics
        assert 'endpoint="unmatched"' not in metrics
        assert (await client.get("/nope", headers={"X-Min-Generation": "99"})).status_code == 503
        for probe in ("/healthz", "/metrics"):  # 200 while the process runs, whatever a proxy adds to requests
            assert (await client.get(probe, headers={"X-Min-Generation": "99"})).status_code == 200, probe
        assert (await client.get("/readyz", headers={"X-Min-Generation": "99"})).status_code == 503  # is it behind?
        metrics = (await client.get("/metrics")).text  # a path outside the API stays one series
        assert 'clipbank_requests_total{endpoint="unmatched",method="GET",status="503"} 1.0' in metrics


async def test_wait_takes_only_all_or_none(tmp_path, backbone):
    async with running_app(tmp_path, backbone) as client:
        data = random_bundle(empty_bank(backbone), "a", seed=1)
        bad = await client.post("/tasks", params={"wait": "some"}, files={"bundle": ("b", data)}, headers=AUTH)
        assert bad.status_code == 422 and "wait" in bad.json()["error"]["message"]


async def test_no_generation_header_and_no_error_while_the_bank_is_still_loading():
    """A registry exists before its bank does: /readyz then must answer 503, not fail on the header (as it once did
    when a readiness probe came in at that moment)."""
    import asyncio
    from types import SimpleNamespace

    from service.middleware import Generations

    class Loading:
        @property
        def bank(self):
            raise RuntimeError("registry.load() has not run")

    service = SimpleNamespace(ready=asyncio.Event(), registry=Loading(), replica="r")
    sent: list[dict] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message):
        sent.append(message)

    await Generations(app, service)({"type": "http", "headers": []}, None, send)
    assert sent[0]["status"] == 503 and sent[0]["headers"] == []
    refused = await Generations(app, service)._refusal(b"1")
    assert refused.status_code == 503  # not ready: behind any generation asked for


def test_metrics_carry_the_replica_label_only_when_one_is_set():
    """Ray Serve replicas set it (a scrape through the proxy reaches any one of them); a single process does not."""
    from service.metrics import Metrics

    metrics = Metrics()
    metrics.generation.set(3)
    metrics.routes.labels(task="cars").inc()
    assert "clipbank_bank_generation 3.0" in metrics.render().decode()
    metrics.replica = "r1"
    text = metrics.render().decode()
    assert 'clipbank_bank_generation{replica="r1"} 3.0' in text
    assert 'clipbank_routes_total{replica="r1",task="cars"} 1.0' in text
    assert "clipbank_bank_generation 3.0" not in text and 'clipbank_routes_total{task="cars"}' not in text


async def test_min_generation_waits_a_bounded_time_for_a_store_that_does_not_answer(tmp_path, backbone, monkeypatch):
    """An object store that stopped answering held such a request for 240 s (the client's retries of a 60 s read)."""
    import time

    from service import middleware
    from service.registry import Registry

    monkeypatch.setattr(middleware, "REFRESH_WAIT_SECONDS", 0.3)
    async with running_app(tmp_path, backbone) as client:
        monkeypatch.setattr(Registry, "refresh", lambda self: time.sleep(3) or False)  # the store hangs
        start = time.monotonic()
        answer = await client.post("/classify", headers={"X-Min-Generation": "5"}, **classify_form())
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "stale_replica"
        assert time.monotonic() - start < 2

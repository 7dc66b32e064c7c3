"""The server on an S3 store (a real S3 API server on 127.0.0.1): two servers share one bank, and an endpoint
that goes down fails writes with a clear 503 while the bank keeps serving."""

from __future__ import annotations

import anyio
import pytest

from model_store.bank import empty_bank
from tests.helpers import random_bundle
from tests.service.conftest import AUTH, running_app
from tests.service.images import colour

pytestmark = pytest.mark.anyio


def upload(data: bytes) -> dict:
    return {"files": {"bundle": ("b.safetensors", data)}, "headers": AUTH}


async def classify(client) -> dict:
    response = await client.post("/classify", files=[("images", ("x.png", colour("red")))], data={"labels": ["a", "b"]})
    assert response.status_code == 200, response.text
    return response.json()


async def test_two_servers_share_one_s3_bank(tmp_path, backbone, s3_env):
    store = f"s3://{s3_env}/bank"
    data = random_bundle(empty_bank(backbone), "cars", seed=3)
    async with running_app(tmp_path / "a", backbone, store=store, poll_seconds=0.2) as a:
        async with running_app(tmp_path / "b", backbone, store=store, poll_seconds=0.2) as b:
            pushed = await a.post("/tasks", **upload(data))
            assert pushed.status_code == 201, pushed.text
            generation = pushed.json()["generation"]
            assert (await classify(a))["timing"]["generation"] == generation
            with anyio.fail_after(20):  # b sees it by polling the index (a conditional GET)
                while (await classify(b))["timing"]["generation"] != generation:
                    await anyio.sleep(0.1)
            listed = (await b.get("/tasks", headers=AUTH)).json()
            assert [t["task"] for t in listed["tasks"]] == ["cars"]


async def test_an_s3_endpoint_that_goes_down_fails_writes_and_the_bank_keeps_serving(tmp_path, backbone, s3_env):
    from moto.server import ThreadedMotoServer

    own = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    own.start()
    host, port = own.get_host_and_port()
    import boto3

    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="clipbank-down")
    bank = empty_bank(backbone)
    settings = {"store": "s3://clipbank-down/bank", "poll_seconds": 0.2}
    with pytest.MonkeyPatch.context() as m:
        m.setenv("CLIPBANK_S3_ENDPOINT_URL", f"http://{host}:{port}")
        async with running_app(tmp_path, backbone, **settings) as client:
            assert (await client.post("/tasks", **upload(random_bundle(bank, "cars", seed=1)))).status_code == 201
            before = await classify(client)
            own.stop()
            refused = await client.post("/tasks", **upload(random_bundle(bank, "boats", seed=2)))
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"
            assert "testing" not in refused.text  # no credential in an error
            await anyio.sleep(0.5)  # polls fail meanwhile
            after = await classify(client)
            assert after["timing"]["generation"] == before["timing"]["generation"]


async def test_a_server_whose_store_cannot_be_read_at_start_reads_it_once_and_serves_zero_shot(
    tmp_path, backbone, monkeypatch
):
    """An outside check: with the S3 endpoint hanging, start-up read the index (30 s to time out), then read it
    again to say what it serves (30 s more): 503 to everything for 80 s. Read once; zero-shot is served."""
    import socket

    import service.lifecycle as lifecycle

    said: list = []
    monkeypatch.setattr(lifecycle, "_say_store", said.append)
    with socket.socket() as closed:  # a port nothing listens on: every read fails
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("CLIPBANK_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    async with running_app(tmp_path, backbone, store="s3://down/bank") as client:
        assert (await classify(client))["results"][0]["route"]["task"] is None  # zero-shot CLIP
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and "could not read the index" in ready.text, ready.text
        assert "the object store s3://down/bank could not" in ready.text  # the bucket named: "object store bank" hid it
    assert said == []


@pytest.mark.parametrize("broad", [True, False], ids=["over-broad", "normal"])
async def test_a_change_landing_on_another_servers_change_is_gated_against_it(
    tmp_path, backbone, s3_env, bundles, broad
):
    """S3 has no lock: server b activates textures while server a is checking an upload of glyphs. a's write then
    meets a store it did not check, so it checks again against textures: an over-broad glyphs is refused (it would
    take textures' images), a normal one lands with a report that has textures in it."""
    from tests.helpers import over_broad

    store = f"s3://{s3_env}/bank"
    glyphs = over_broad(bundles["glyphs"]) if broad else bundles["glyphs"]
    async with running_app(tmp_path / "a", backbone, store=store, poll_seconds=60) as a:
        async with running_app(tmp_path / "b", backbone, store=store, poll_seconds=60) as b:
            stored = await b.post("/tasks", params={"mode": "inactive"}, **upload(bundles["textures"]))
            assert stored.status_code == 201, stored.text  # glyphs uses its experts; not routed to yet
            mine, other = a.app.state.service.registry, b.app.state.service.registry
            checks: list[list[str]] = []

            class Meanwhile:  # a's gate: b's change lands while a checks its first candidate
                def report(self, candidate, task, serving=None):
                    if not checks:
                        other.activate("textures", 1)
                    checks.append(sorted(t.name for t in candidate.tasks))
                    return gate.report(candidate, task, serving)

            gate, mine.gate = mine.gate, Meanwhile()
            r = await a.post("/tasks", **upload(glyphs))
            assert checks == [["glyphs"], ["glyphs", "textures"]]
            if broad:
                assert r.status_code == 409 and r.json()["error"]["code"] == "interference", r.text
                assert "'textures'" in r.json()["error"]["message"]
                listed = (await b.get("/tasks", headers=AUTH)).json()
                assert [t["task"] for t in listed["tasks"]] == ["textures"]  # nothing of glyphs stored
            else:
                assert r.status_code == 201, r.text
                assert "textures" in r.json()["gate"]["stolen"]  # the report kept is the check of the real bank
            assert (await a.get("/tasks/textures", headers=AUTH)).json()["serving"]  # a serves b's change

"""The latency probe's hand-built multipart body is a request the server reads as its client's would be."""

from __future__ import annotations

import pytest

from benchmarks.latency import multipart_body
from tests.service.conftest import running_app
from tests.service.images import colour

pytestmark = pytest.mark.anyio


async def test_hand_built_multipart_body_is_read_like_a_clients(tmp_path, backbone):
    labels = ["red", "green", "blue"]
    images = [("images", colour("blue")), ("images", colour("red"))]
    body, ctype = multipart_body([("labels", x) for x in labels], images)
    async with running_app(tmp_path, backbone) as c:
        r = await c.post("/classify", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 200, r.text
        assert [res["labels"][0]["label"] for res in r.json()["results"]] == ["blue", "red"]
        assert {x["label"] for x in r.json()["results"][0]["labels"]} == set(labels)

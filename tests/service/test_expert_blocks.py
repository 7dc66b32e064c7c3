"""A bank's tasks share one K (experts in the top K blocks): the server serves such a bank, and refuses an upload
with another K with a 422 that names both."""

from __future__ import annotations

import pytest

from benchmarks.synthetic import synthetic_bundle
from model_store.bank import empty_bank
from tests.helpers import random_bundle
from tests.service.conftest import AUTH, running_app
from tests.service.images import colour
from training.expert_blocks import with_expert_blocks

pytestmark = pytest.mark.anyio


def push(client, data: bytes):
    return client.post("/tasks", files={"bundle": ("b", data)}, headers=AUTH)


async def test_a_bank_of_top_k_experts_serves_and_refuses_another_k(tmp_path, backbone):
    k2 = with_expert_blocks(empty_bank(backbone), 2)
    async with running_app(tmp_path, backbone) as client:
        assert (await push(client, synthetic_bundle(k2, "cars", seed=1))).status_code == 201
        files = [("images", ("x.png", colour("red"))), ("images", ("y.png", colour("blue")))]
        answer = await client.post("/classify", files=files, data={"task": "cars"})
        assert answer.status_code == 200, answer.text
        assert {r["route"]["task"] for r in answer.json()["results"]} == {"cars"}
        refused = await push(client, random_bundle(empty_bank(backbone), "boats", seed=2))
        assert refused.status_code == 422, refused.text
        message = refused.json()["error"]["message"]
        assert "every block" in message and "top 2 blocks" in message and "--expert-blocks 2" in message

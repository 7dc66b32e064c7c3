"""The naive baseline server of the serving benchmark answers like a zero-shot CLIP classifier."""

from __future__ import annotations

import httpx
import pytest

from benchmarks.baseline import create_baseline_app
from tests.service.images import colour

pytestmark = pytest.mark.anyio


async def test_baseline_classifies_zero_shot_with_sorted_probabilities():
    app = create_baseline_app("tiny")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://baseline") as client:
        assert (await client.get("/readyz")).status_code == 200
        names = ["red", "green", "blue"]
        files = [("images", (f"{n}.png", colour(n))) for n in names]
        r = await client.post("/classify", files=files, data={"labels": names})
        assert r.status_code == 200
        results = r.json()["results"]
        assert len(results) == 3
        for name, result in zip(names, results, strict=True):
            probs = [p for _, p in result["labels"]]
            assert probs == sorted(probs, reverse=True)
            assert abs(sum(probs) - 1) < 1e-4
            assert result["labels"][0][0] == name  # the tiny CLIP knows plain colours

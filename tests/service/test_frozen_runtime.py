"""Which runtime serves the frozen passes: auto picks ONNX Runtime on CPU, and the answers do not change."""

from __future__ import annotations

import pytest

from model_store.backbone import load_backbone
from service.config import ServeConfig
from tests.service.conftest import TOKEN, failed_app, running_app
from tests.service.images import colour

pytestmark = pytest.mark.anyio
NAMES = ["red", "green", "blue"]


async def test_each_server_owns_its_runtime_and_a_shared_backbone_is_never_changed(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("CLIPBANK_ONNX_CACHE", str(tmp_path / "onnx"))
    shared = load_backbone("tiny", "cpu")
    runtime = shared.frozen
    async with running_app(tmp_path / "a", shared, frozen_runtime="onnx") as c:
        assert (await c.get("/readyz")).json()["frozen_runtime"] == "onnx"
        service = c.app.state.service
        assert service.backbone is not shared and service.backbone.model is shared.model  # no copy of the weights
        assert service.registry.bank.backbone is service.backbone
        assert shared.frozen is runtime  # the runtime is the server's, not patched into the shared object
    async with running_app(tmp_path / "b", shared, frozen_runtime="torch") as c:
        assert (await c.get("/readyz")).json()["frozen_runtime"] == "torch"
    assert shared.frozen is runtime and runtime.name == "torch"


async def _answers(client) -> list[list]:
    files = [("images", (f"{n}.png", colour(n))) for n in NAMES]
    r = await client.post("/classify", files=files, data={"labels": NAMES})
    assert r.status_code == 200, r.text
    return [[(x["label"], x["score"]) for x in res["labels"]] for res in r.json()["results"]]


async def test_auto_serves_the_frozen_pass_from_onnx_runtime_on_cpu_with_the_same_answers(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("CLIPBANK_ONNX_CACHE", str(tmp_path / "onnx"))
    async with running_app(tmp_path / "a", load_backbone("tiny", "cpu"), frozen_runtime="torch") as c:
        assert (await c.get("/readyz")).json()["frozen_runtime"] == "torch"
        reference = await _answers(c)
    async with running_app(tmp_path / "b", load_backbone("tiny", "cpu"), frozen_runtime="auto") as c:
        assert (await c.get("/readyz")).json()["frozen_runtime"] == "onnx"
        got = await _answers(c)
    assert any((tmp_path / "onnx").iterdir())
    for ref, new in zip(reference, got, strict=True):
        assert [label for label, _ in ref] == [label for label, _ in new]
        assert max(abs(a - b) for (_, a), (_, b) in zip(ref, new, strict=True)) <= 1e-4
    assert [r[0][0] for r in got] == NAMES


async def test_an_unusable_onnx_runtime_fails_the_start_only_when_asked_for(tmp_path, monkeypatch):
    from model_store import onnx_runtime

    def broken(*args, **kwargs):  # not only BackboneError: a cache folder one may not write, say
        raise PermissionError("no exporter here")

    monkeypatch.setattr(onnx_runtime, "with_onnx_runtime", broken)
    async with running_app(tmp_path / "a", load_backbone("tiny", "cpu"), frozen_runtime="auto") as c:
        assert (await c.get("/readyz")).json()["frozen_runtime"] == "torch"  # auto falls back, and says so
        assert [r[0][0] for r in await _answers(c)] == NAMES
    config = ServeConfig(store=str(tmp_path / "b"), admin_token=TOKEN, frozen_runtime="onnx")
    async with failed_app(config, load_backbone("tiny", "cpu")) as (c, failures):
        r = await c.get("/readyz")
        assert r.status_code == 503 and "no exporter here" in r.json()["error"]["message"]
    assert failures and "no exporter here" in failures[0]

"""AsyncClipbankClient: the same calls as ClipbankClient, awaited, on a real app in process and on scripted answers
(an outside check: called from an `async def` FastAPI handler, the blocking client froze the whole app)."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import pytest
from PIL import Image

from service.client_async import AsyncClipbankClient
from service.client_wire import ClipbankHTTPError
from tests.helpers import random_bundle
from tests.service.conftest import TOKEN, running_app

pytestmark = pytest.mark.anyio
OK = {"results": [{"labels": [{"label": "cat", "score": 0.9}], "route": {}}], "timing": {}}


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, "PNG")
    return buf.getvalue()


_REAL_ASYNC_CLIENT = httpx.AsyncClient


def _on(monkeypatch, transport: httpx.AsyncBaseTransport) -> None:
    """Clients made from now on talk to `transport` (the real class each time: a second `_on` in a test once
    wrapped the first, so its client still talked to the first transport)."""

    def patched(*a, **k):
        return _REAL_ASYNC_CLIENT(*a, **{**k, "transport": transport})

    monkeypatch.setattr(httpx, "AsyncClient", patched)


async def test_push_list_activate_classify_and_delete_on_a_real_app(tmp_path, backbone, monkeypatch):
    from model_store.bank import empty_bank

    bank = empty_bank(backbone)
    bundle_v1, bundle_v2 = (random_bundle(bank, "async-task", version=v, seed=v) for v in (1, 2))
    async with running_app(tmp_path, backbone) as app_client:
        _on(monkeypatch, httpx.ASGITransport(app=app_client.app))
        async with AsyncClipbankClient("http://clipbank", token=TOKEN) as c:
            first = await c.push(bundle_v1)
            path = tmp_path / "v2.bundle"
            path.write_bytes(bundle_v2)
            second = await c.push(path, mode="inactive")  # streamed from its file, open while awaited
            assert (first["version"], second["version"]) == (1, 2)
            listed = await c.tasks(min_generation=second["generation"])
            assert [t["task"] for t in listed["tasks"]] == ["async-task"]
            assert (await c.activate("async-task", 2))["active_version"] == 2
            images = [_png("red"), Image.new("RGB", (40, 30), "blue"), _png("green")]
            answer = await c.classify(images, ["cat", "dog"], task="async-task")
            assert len(answer["results"]) == 3 and {r["route"]["version"] for r in answer["results"]} == {2}
            mixed = await c.classify([_png("red"), b"not an image", _png("blue")], ["cat"], skip_bad=True)
            assert [sorted(r) for r in mixed["results"]] == [["labels", "route"], ["error"], ["labels", "route"]]
            assert mixed["results"][1]["error"]["status"] == 422 and "requests" not in mixed  # one request
            zero = await c.classify([_png("red")], ["red", "blue"], task="zero-shot", top_k=1)
            assert zero["results"][0]["route"]["task"] is None
            with pytest.raises(ClipbankHTTPError) as e:
                await c.task("no-such-task")
            assert e.value.status == 404 and e.value.code == "task_not_found"
            assert (await c.delete("async-task"))["task"] == "async-task"
            assert (await c.ready())["tasks"] == [] and "status" in await c.health()
        with pytest.raises(RuntimeError, match="this AsyncClipbankClient is closed"):
            await c.tasks()
    assert repr(c) == "AsyncClipbankClient('http://clipbank', token=set, timeout=60.0, retries=0)"


async def test_retries_wait_without_blocking_the_loop_and_a_413_splits_the_call(monkeypatch):
    calls: list[tuple[str, int]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        images = request.content.count(b'name="images"')
        calls.append((request.url.path, images))
        if len(calls) == 1:
            error = {"error": {"code": "overloaded", "message": "the queue is full", "details": None}}
            return httpx.Response(503, json=error, headers={"Retry-After": "0.2"})
        if images > 2:
            details = {"setting": "max_images", "limit": 2}
            return httpx.Response(413, json={"error": {"code": "too_many", "message": "x", "details": details}})
        return httpx.Response(200, json={"results": [OK["results"][0]] * images, "timing": {}})

    _on(monkeypatch, httpx.MockTransport(handler))
    ticks = 0

    async def ticker() -> None:  # runs while the client waits: the loop is free
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.create_task(ticker())
    async with AsyncClipbankClient("http://srv", retries=2) as c:
        began = time.monotonic()
        answer = await c.classify([_png("red")] * 5, ["cat"])
    beat.cancel()
    assert time.monotonic() - began >= 0.2 and ticks >= 10
    assert answer["requests"] == 3 and len(answer["results"]) == 5
    assert calls == [("/classify", 5), ("/classify", 5), ("/classify", 2), ("/classify", 2), ("/classify", 1)]
    calls.clear()
    async with AsyncClipbankClient("http://srv", retries=3) as c:
        with pytest.raises(ClipbankHTTPError, match="the queue is full"):  # a change is never sent twice
            await c.push(b"bundle bytes")
    assert calls == [("/tasks", 0)]


async def test_a_cancelled_call_ends_at_once_and_errors_are_the_sync_clients(monkeypatch):
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(30)
        return httpx.Response(200, json=OK)

    _on(monkeypatch, httpx.MockTransport(slow))
    async with AsyncClipbankClient("http://srv") as c:
        began = time.monotonic()
        with pytest.raises(TimeoutError):  # asyncio.wait_for: Python 3.10 has no asyncio.timeout
            await asyncio.wait_for(c.classify([_png("red")], ["cat"]), 0.2)
        assert time.monotonic() - began < 5
        with pytest.raises(TypeError, match="images and labels are lists"):  # checked before anything is sent
            await c.classify(_png("red"), ["cat"])
        with pytest.raises(ValueError, match="no task can have that name"):
            await c.activate("../x", 1)
        with pytest.raises(TypeError, match="activate is True or False"):  # read in the worker thread
            await c.push(_png("red"), activate="false")
        with pytest.raises(TypeError, match="purge is True or False"):
            await c.delete("t", purge="yes")
    _on(monkeypatch, httpx.MockTransport(lambda r: httpx.Response(200, text="<html>hello</html>")))
    async with AsyncClipbankClient("http://srv") as c:
        with pytest.raises(ClipbankHTTPError) as e:
            await c.tasks()
    assert e.value.code == "not_clipbank"


async def test_images_and_bundles_are_read_off_the_event_loop(monkeypatch):
    """Reading a file or encoding an image on the loop's thread stops every other task meanwhile (the review: a
    200 MB bundle stalled the loop for 0.25 s)."""
    import threading

    readers: list[threading.Thread] = []

    class Recorded(io.BytesIO):
        def read(self, *a):
            readers.append(threading.current_thread())
            return super().read(*a)

    answers = {"/classify": OK, "/tasks": {"task": "t", "version": 1, "bundle_id": "b" * 64}}
    _on(monkeypatch, httpx.MockTransport(lambda r: httpx.Response(200, json=answers[r.url.path])))
    async with AsyncClipbankClient("http://srv") as c:
        await c.classify([Recorded(_png("red"))], ["cat"])
        assert (await c.push(Recorded(b"a bundle")))["version"] == 1
    assert len(readers) >= 2 and threading.current_thread() not in readers

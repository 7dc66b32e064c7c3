"""Hardening regressions: label-set encoding shares the compute thread, and the smaller faults of the audit."""

from __future__ import annotations

import asyncio
import io
import logging

import anyio
import pytest
import torch
from PIL import Image

from model_store.bank import empty_bank
from model_store.inference import ClassifyItem, classify_batch
from service.batching import Batcher
from service.config import Limits, ServeConfig
from service.images import open_image, preprocess_all
from service.protocol import PEER
from service.steps import StepBudget
from tests.helpers import random_bundle, with_version
from tests.service.conftest import AUTH, running_app
from tests.service.images import colour

pytestmark = pytest.mark.anyio


def _image(backbone, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(seed))


def _submitter(batcher: Batcher, finished: list[str]):
    """Submit `item` after `delay` seconds; `finished` records the order of the answers."""

    async def run(name: str, item: ClassifyItem, delay: float):
        await asyncio.sleep(delay)
        out = await batcher.submit(item)
        finished.append(name)
        return out

    return run


async def test_a_long_new_label_list_does_not_hold_the_compute_thread(backbone):
    bank = empty_bank(backbone)
    batcher = Batcher(
        lambda: bank, max_batch=8, max_wait_ms=0, budget=StepBudget(inline_chars=200, text_step_seconds=0.005)
    )
    batcher.start()
    try:
        big = ClassifyItem(_image(backbone), tuple(f"new label {i}" for i in range(600)), "zero-shot")
        small = ClassifyItem(_image(backbone, 1), ("red", "blue"), "zero-shot")
        finished: list[str] = []
        run = _submitter(batcher, finished)
        (big_results, _), _ = await asyncio.gather(run("big", big, 0), run("small", small, 0.05))
        assert finished == ["small", "big"]  # the short request did not wait for 600 prompts
        assert batcher.steps.text_steps >= 5  # the long list was encoded in steps
        (alone,) = classify_batch(bank, [big])  # and in steps it gives the same answer
        got, want = dict(big_results[0].labels), dict(alone[0].labels)
        assert got.keys() == want.keys() and max(abs(got[k] - want[k]) for k in got) < 1e-5
    finally:
        batcher.stop()


async def test_labels_a_task_partly_knows_encoded_in_steps_give_the_same_split_answer(backbone):
    """Such labels need two text passes, the task's and zero-shot CLIP's (`inference.split_probs`): both are
    encoded in steps beside other work, and the answer is the one computed at once."""
    from model_store.bank import build_bank
    from model_store.bundle import read_bundle
    from tests.helpers import over_broad

    bundle = over_broad(random_bundle(empty_bank(backbone), "pets", seed=3, classes=("cat", "dog")))
    bank = build_bank(backbone, [read_bundle(bundle)])
    batcher = Batcher(
        lambda: bank, max_batch=8, max_wait_ms=0, budget=StepBudget(inline_chars=200, text_step_seconds=0.005)
    )
    batcher.start()
    try:
        labels = ("cat", *(f"new label {i}" for i in range(300)), "Dog")
        item = ClassifyItem(_image(backbone), labels)
        (results, _) = await batcher.submit(item)
        assert results[0].route.task == "pets" and batcher.steps.text_steps >= 4
        (alone,) = classify_batch(bank, [item])
        got, want = dict(results[0].labels), dict(alone[0].labels)
        assert got.keys() == want.keys() and max(abs(got[k] - want[k]) for k in got) < 1e-5
    finally:
        batcher.stop()


async def test_parked_label_work_of_a_client_that_went_away_is_dropped(backbone):
    bank = empty_bank(backbone)
    budget = StepBudget(inline_chars=200, text_step_seconds=0.002, max_parked_prompts=1000)
    batcher = Batcher(lambda: bank, max_batch=8, max_wait_ms=0, budget=budget)
    batcher.start()
    try:
        labels = tuple(f"a label nobody sent before, number {i}" for i in range(900))  # 900 parked prompts
        gone = asyncio.create_task(batcher.submit(ClassifyItem(_image(backbone), labels, "zero-shot")))
        while batcher.steps.text_steps < 3:  # parked, and being encoded a step at a time
            await asyncio.sleep(0.005)
        gone.cancel()  # what the route does when its client disconnects

        def dropped() -> float | None:  # counted where an operator sees it
            return batcher.metrics.registry.get_sample_value("clipbank_abandoned_requests_total", {"stage": "in_steps"})

        for _ in range(400):  # (the compute thread pops a work before its step: `steps` may look empty meanwhile)
            if dropped():
                break
            await asyncio.sleep(0.005)
        steps = batcher.steps.text_steps
        await asyncio.sleep(0.05)
        assert dropped() == 1 and not batcher.steps  # its work left the compute thread
        assert batcher.steps.text_steps == steps  # and nothing more of it was encoded
        others = tuple(f"another new label {i}" for i in range(900))  # would pass max_parked_prompts beside it
        results, _ = await batcher.submit(ClassifyItem(_image(backbone, 1), others, "zero-shot"))
        assert len(results[0].labels) == 900 and batcher.steps.text_steps > steps
    finally:
        batcher.stop()


async def test_a_large_batch_runs_in_slices_and_a_small_request_slips_between_them(backbone):
    bank = empty_bank(backbone)
    budget = StepBudget(image_step_seconds=0.001)  # a few images per step
    batcher = Batcher(lambda: bank, max_batch=64, max_wait_ms=0, budget=budget)
    batcher.start()
    try:
        images = torch.rand(64, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(3))
        big = ClassifyItem(images, ("red", "blue"), "zero-shot")
        small = ClassifyItem(_image(backbone, 1), ("red", "blue"), "zero-shot")
        finished: list[str] = []
        run = _submitter(batcher, finished)
        (big_results, _), _ = await asyncio.gather(run("big", big, 0), run("small", small, 0.02))
        assert finished == ["small", "big"] and batcher.steps.image_steps > 4
        (alone,) = classify_batch(bank, [big])  # in slices, the same answers
        for got, want in zip(big_results, alone, strict=True):
            assert max(abs(a[1] - b[1]) for a, b in zip(got.labels, want.labels, strict=True)) < 1e-5
    finally:
        batcher.stop()


async def test_a_request_over_max_request_prompts_is_413(tmp_path, backbone):
    labels = [f"label {i}" for i in range(40)]
    async with running_app(tmp_path, backbone, limits=Limits(max_request_prompts=32)) as c:
        files = [("images", ("r.png", colour("red")))]
        r = await c.post("/classify", files=files, data={"labels": labels, "task": "zero-shot"})
        assert r.status_code == 413 and "max_request_prompts=32" in r.json()["error"]["message"]
        assert r.json()["error"]["details"] == {"setting": "max_request_prompts", "limit": 32}
        r = await c.post("/classify", files=files, data={"labels": labels[:30], "task": "zero-shot"})
        assert r.status_code == 200


def _jpeg(img: Image.Image, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_exif_orientation_is_applied():
    upright = Image.new("RGB", (40, 20), (255, 255, 255))
    upright.paste((255, 0, 0), (0, 0, 10, 20))  # red on the left
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways stores
    got = open_image(_jpeg(stored, orientation=6), "img", Limits())
    assert got.size == (40, 20)
    assert got.getpixel((2, 10))[0] > 200 and got.getpixel((37, 10))[1] > 200  # red left, white right


def test_large_jpegs_decode_at_a_reduced_scale_with_the_same_features(backbone):
    g = torch.Generator().manual_seed(0)
    small = (torch.rand(60, 80, 3, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(small).resize((1600, 1200), Image.Resampling.BICUBIC)  # smooth, like a photo
    data = _jpeg(img)
    full = backbone.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))
    reduced = preprocess_all([("p", data)], backbone.preprocess, Limits(), backbone.image_size)[0]
    assert (full - reduced).abs().mean() < 0.05  # normalised units: about 1% of the range
    emb = backbone.model.encode_image(torch.stack([full, reduced]), normalize=True)
    assert float(emb[0] @ emb[1]) > 0.99


def test_every_bad_setting_is_named_even_when_a_variable_does_not_parse():
    with pytest.raises(ValueError) as e:
        ServeConfig.from_env({"CLIPBANK_PORT": "eighty", "CLIPBANK_MAX_BATCH": "0", "CLIPBANK_MAX_LABELS": "x"})
    for words in ("CLIPBANK_PORT='eighty'", "CLIPBANK_MAX_LABELS='x'", "max_batch must be in 1..4096"):
        assert words in str(e.value)


async def test_openapi_says_classify_is_open_unless_a_classify_token_is_set(tmp_path, backbone):
    async with running_app(tmp_path, backbone) as c:
        spec = (await c.get("/openapi.json")).json()
        assert "security" not in spec["paths"]["/classify"]["post"]
        assert spec["paths"]["/tasks"]["post"]["security"]
    async with running_app(tmp_path, backbone, classify_token="classify-token-0123456789") as c:
        assert (await c.get("/openapi.json")).json()["paths"]["/classify"]["post"]["security"]


async def test_overloaded_and_not_ready_say_when_to_retry(tmp_path, backbone):
    limits = Limits(max_images=2)
    async with running_app(tmp_path, backbone, limits=limits, max_batch=2, max_queue_images=2, max_wait_ms=1000) as c:
        files = [("images", ("r.png", colour("red")))]
        rs = await asyncio.gather(*[c.post("/classify", files=files, data={"labels": ["a", "b"]}) for _ in range(5)])
        busy = [r for r in rs if r.status_code == 503]
        assert busy and all(r.headers["Retry-After"] == "1" for r in busy)


async def test_a_peer_servers_change_is_not_called_serving_before_this_server_swaps(tmp_path, backbone):
    v1 = random_bundle(empty_bank(backbone), "peer", seed=41)
    async with running_app(tmp_path, backbone) as a, running_app(tmp_path, backbone, poll_seconds=3600) as b:
        assert (await a.post("/tasks", files={"bundle": ("b", v1)}, headers=AUTH)).status_code == 201
        info = (await b.get("/tasks/peer", headers=AUTH)).json()
        assert info["active_version"] == 1 and not info["serving"] and info["serving_version"] is None
        assert info["classes"] == ["red", "blue", "green"]  # from the index, without loading the blob
        b.app.state.service.registry.refresh()
        info = (await b.get("/tasks/peer", headers=AUTH)).json()
        assert info["serving"] and info["serving_version"] == 1
        assert (await a.post("/tasks", files={"bundle": ("b", with_version(v1, 2))}, headers=AUTH)).status_code == 201
        info = (await b.get("/tasks/peer", headers=AUTH)).json()
        assert (info["active_version"], info["serving"], info["serving_version"]) == (2, False, 1)


def _http_scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict:
    """The ASGI scope of a POST to `path` from 127.0.0.1, for a test that plays the server's side of the socket."""
    return {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("clipbank", 80),
        "scheme": "http",
        "root_path": "",
    }


async def test_a_client_that_hangs_up_mid_upload_is_a_499_with_one_log_line(tmp_path, backbone, caplog):
    async with running_app(tmp_path, backbone) as c:
        app = c.app
        kind, body = "multipart/form-data; boundary=zz", b'--zz\r\nContent-Disposition: form-data; name="bundle"'
        messages = [{"type": "http.request", "body": body, "more_body": True}, {"type": "http.disconnect"}]
        scope = _http_scope(
            "/tasks", [(b"content-type", kind.encode()), (b"authorization", AUTH["Authorization"].encode())]
        )
        sent: list[dict] = []

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        with caplog.at_level(logging.INFO), anyio.fail_after(10):
            await app(scope, receive, send)
        assert sent[0]["status"] == 499
        assert 'status="499"' in (await c.get("/metrics")).text
        assert not [r for r in caplog.records if r.exc_info], "a hang-up is not an error with a traceback"


async def test_a_client_gone_while_its_request_waits_for_compute_is_a_499_and_never_computed(tmp_path, backbone):
    """An outside check: 16 clients that timed out after sending 64 images each were computed anyway, held the
    queue (the next live clients got 503) and were counted as 200s, with no access line."""
    import threading

    import httpx

    async with running_app(tmp_path, backbone) as c:
        service = c.app.state.service
        hold = threading.Event()  # the compute thread is busy until set: the request waits in the queue
        busy = threading.Thread(target=service.batcher.run, args=(hold.wait,), daemon=True)
        busy.start()
        files = [("images", (f"{i}.png", colour("red"))) for i in range(2)]
        form = httpx.Request("POST", "http://clipbank/classify", files=files, data={"labels": ["red", "blue"]})
        body, kind = form.read(), form.headers["content-type"]
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        hung_up = asyncio.Event()

        async def receive():
            if messages:
                return messages.pop(0)
            await hung_up.wait()
            return {"type": "http.disconnect"}

        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        async def hang_up():
            await asyncio.sleep(0.6)
            assert "clipbank_admitted_images 2.0" in (await c.get("/metrics")).text  # queued, holding capacity
            hung_up.set()

        scope = _http_scope(
            "/classify", [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode())]
        )
        batches = service.batcher.batches
        with anyio.fail_after(10):
            await asyncio.gather(c.app(scope, receive, send), hang_up())
            assert sent[0]["status"] == 499
            assert "clipbank_admitted_images 0.0" in (await c.get("/metrics")).text  # its capacity is back
            hold.set()
            busy.join(5)
            r = await c.post("/classify", files=files, data={"labels": ["red", "blue"]})
        assert r.status_code == 200 and service.batcher.batches == batches + 1  # the live request's batch alone
        assert "clipbank_queue_images 0.0" in (await c.get("/metrics")).text  # the gone one left the queue too
        metrics = (await c.get("/metrics")).text
        assert 'endpoint="/classify",method="POST",status="499"} 1.0' in metrics, metrics
        assert 'clipbank_abandoned_requests_total{stage="queued"} 1.0' in metrics, metrics


async def test_a_request_cancelled_at_shutdown_is_answered_503_not_a_plain_500(tmp_path, backbone, caplog):
    """uvicorn cancels what still runs when the graceful shutdown's 30 s end (here: an upload whose body is still
    coming): its client got a plain-text 500 without a request id, and the log a CancelledError traceback."""
    async with running_app(tmp_path, backbone) as c:
        headers = [(b"content-type", b"multipart/form-data; boundary=zz"), (b"x-request-id", b"slow-upload-1")]
        scope = _http_scope("/tasks", [*headers, (b"authorization", AUTH["Authorization"].encode())])
        first = [
            {
                "type": "http.request",
                "body": b'--zz\r\nContent-Disposition: form-data; name="bundle"',
                "more_body": True,
            }
        ]

        async def receive():  # then the body never comes
            return first.pop() if first else await asyncio.Event().wait()

        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        with caplog.at_level(logging.INFO), anyio.fail_after(10):
            task = asyncio.ensure_future(c.app(scope, receive, send))
            await asyncio.sleep(0.5)
            task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")  # as uvicorn does
            await task  # ends: no CancelledError left for the server to log with a traceback
        assert sent[0]["status"] == 503
        headers = dict(sent[0]["headers"])
        assert headers[b"x-request-id"] == b"slow-upload-1" and headers[b"x-clipbank-error"] == b"not_ready"
        assert b"the server shut down before this request was answered" in sent[1]["body"]
        assert not [r for r in caplog.records if r.exc_info]
        metrics = (await c.get("/metrics")).text  # counted as answered, not as a 500
        assert 'endpoint="/tasks",method="POST",status="503"} 1.0' in metrics and 'status="500"' not in metrics

        sent.clear()  # another cancel (Ray Serve's, when a client leaves) is not answered: it goes on up
        first.append({"type": "http.request", "body": b"--zz", "more_body": True})
        with anyio.fail_after(10):
            task = asyncio.ensure_future(c.app(scope, receive, send))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert sent == []


async def test_start_up_objects_are_kept_out_of_the_collectors_full_passes(tmp_path, backbone):
    import gc

    async with running_app(tmp_path, backbone):
        assert gc.get_freeze_count() > 10_000  # the backbone, the bank and the app, frozen once loaded


async def test_an_error_in_one_request_never_stops_the_compute_thread(backbone, monkeypatch):
    from model_store import text

    bank = empty_bank(backbone)
    batcher = Batcher(lambda: bank, max_batch=8, max_wait_ms=0)
    batcher.start()
    real = text.TextJob.step

    def broken(self, n=text.TEXT_CHUNK):
        if "poison" in self.prompts[0]:
            raise RuntimeError("a tokenizer bug")
        return real(self, n)

    monkeypatch.setattr(text.TextJob, "step", broken)
    try:
        with pytest.raises(RuntimeError, match="tokenizer bug"):  # inline encoding, in the batch's own step
            await batcher.submit(ClassifyItem(_image(backbone), ("poison", "x"), "zero-shot"))
        results, _ = await batcher.submit(ClassifyItem(_image(backbone, 1), ("red", "blue"), "zero-shot"))
        assert len(results) == 1 and batcher._thread.is_alive()
        with pytest.raises(Exception, match="max_batch is 8"):
            await batcher.submit(ClassifyItem(torch.zeros(9, 3, backbone.image_size, backbone.image_size)))
    finally:
        batcher.stop()
    with pytest.raises(Exception, match="shutting down"):
        await batcher.submit(ClassifyItem(_image(backbone), ("a", "b"), "zero-shot"))


def test_keep_alive_must_be_shorter_than_the_head_deadline():
    with pytest.raises(ValueError, match="keep_alive_seconds .* must be below head_timeout_seconds"):
        ServeConfig(keep_alive_seconds=10, head_timeout_seconds=10)


def _holding_body_limit(**settings):
    """A BodyLimit around an app that reads its whole body, then holds it until the returned event is set; and a
    `post(chunks, declared=None, client="10.0.0.1")` that sends a body through it and returns (status, answer)."""
    import json

    from fastapi import FastAPI

    from service.errors import install_handlers
    from service.middleware import BodyLimit

    release = anyio.Event()

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    inner = FastAPI()
    install_handlers(inner)
    inner.mount("/", app)
    limited = BodyLimit(inner, lambda method, path: (1000, "max_request_bytes"), **settings)

    async def post(
        chunks: list[bytes], declared: int | None = None, client: str = "10.0.0.1", peer: str | None = None
    ) -> tuple[int, dict]:
        parts = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
        sent: list[dict] = []

        async def receive():
            return parts.pop(0) if parts else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        headers = [(b"content-length", str(declared).encode())] if declared is not None else []
        scope = {"type": "http", "method": "POST", "path": "/classify", "headers": headers, "query_string": b""}
        scope |= {"root_path": "", "raw_path": b"/classify", "client": (client, 40000)}
        if peer is not None:  # the socket's own peer, where X-Forwarded-For gave `client`
            scope[PEER] = (peer, 40000)
        await limited(scope, receive, send)
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        headers = {k.decode().lower(): v.decode() for k, v in sent[0].get("headers", [])}
        return sent[0]["status"], {"headers": headers, "body": json.loads(body) if body != b"ok" else body}

    return limited, release, post


async def test_bodies_held_at_once_over_all_connections_are_bounded():
    """Each body within its own limit, slow clients together held max_connections x 64 MiB. Past
    `max_buffered_bytes` the request that would cross it gets 503 overloaded; bytes are released once answered."""
    limited, release, post = _holding_body_limit(max_buffered=1500)
    async with anyio.create_task_group() as tg:
        results: list = []

        async def first():
            results.append(await post([b"x" * 400, b"x" * 400]))

        tg.start_soon(first)
        await anyio.sleep(0.05)  # the first holds 800 bytes
        status, answer = await post([b"y" * 400, b"y" * 400], client="10.0.0.2")  # would hold 1600
        assert status == 503 and answer["headers"]["retry-after"] == "1"
        assert (
            answer["body"]["error"]["code"] == "overloaded"
            and "max_buffered_bytes=1500" in answer["body"]["error"]["message"]
        )
        status, answer = await post([b"z"], declared=900, client="10.0.0.3")  # refused from its Content-Length
        assert status == 503 and limited.held == 800
        release.set()
    assert results[0][0] == 200 and limited.held == 0
    assert (await post([b"y" * 400, b"y" * 400]))[0] == 200  # released: the same body now fits


async def test_one_client_may_hold_only_its_share_of_the_buffered_bodies():
    """A client fast enough to send 1 GiB a minute held all of `max_buffered_bytes`, and every other client's
    /classify got 503. One address (an IPv6 client by its /64) may now hold `max_client_buffered_bytes`."""
    limited, release, post = _holding_body_limit(max_buffered=3000, max_per_client=1000)
    async with anyio.create_task_group() as tg:
        results: list = []

        async def hold(client: str):
            results.append(await post([b"x" * 400, b"x" * 400], client=client))

        tg.start_soon(hold, "10.0.0.1")
        tg.start_soon(hold, "2001:db8::1")
        await anyio.sleep(0.05)  # each holds 800 bytes
        for client in ("10.0.0.1", "2001:db8::2"):  # the same address; the same /64
            status, answer = await post([b"y" * 300], client=client)
            message = answer["body"]["error"]["message"]
            assert status == 503 and answer["body"]["error"]["code"] == "overloaded", client
            assert "max_client_buffered_bytes=1000" in message and "holds 800 bytes" in message, client
            assert answer["headers"]["retry-after"] == "1"
        status, _ = await post([b"y" * 100], declared=300, client="10.0.0.1")  # from its Content-Length, unread
        assert status == 503 and limited.held == 1600
        tg.start_soon(hold, "10.0.0.9")  # another client's body is taken
        await anyio.sleep(0.05)
        assert limited.held == 2400 and limited.held_by == {"10.0.0.1": 800, "2001:db8::/64": 800, "10.0.0.9": 800}
        release.set()
    assert [r[0] for r in results] == [200, 200, 200] and limited.held == 0 and limited.held_by == {}
    assert (await post([b"y" * 900], client="10.0.0.1"))[0] == 200  # its bytes were given back


async def test_the_client_share_keys_on_the_sockets_peer_not_a_forwarded_address():
    """uvicorn trusts X-Forwarded-For from 127.0.0.1: any local process could name itself anew per request and
    pass its share. The share keys on the socket's peer, as the connection cap does; the client stays forwarded."""
    from service.server import peer_then_forwarded

    seen: dict = {}

    async def app(scope, receive, send):
        seen.update(client=scope["client"], peer=scope[PEER])

    scope = {"type": "http", "client": ("127.0.0.1", 5000), "headers": [(b"x-forwarded-for", b"10.9.9.9")]}
    await peer_then_forwarded(app)({**scope, "scheme": "http"}, None, None)
    assert seen == {"client": ("10.9.9.9", 0), "peer": ("127.0.0.1", 5000)}
    forged = [(b"x-forwarded-for", b'"hello world" - "GET /tasks HTTP/1.1" 200 OK fake')]  # a log line, forged
    await peer_then_forwarded(app)({**scope, "headers": forged, "scheme": "http"}, None, None)
    assert seen["client"] == ("127.0.0.1", 5000)  # not an address: the socket's peer is logged
    limited, release, post = _holding_body_limit(max_buffered=3000, max_per_client=1000)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: post([b"x" * 400, b"x" * 400], client="10.9.9.1", peer="127.0.0.1"))
        await anyio.sleep(0.05)
        status, answer = await post([b"y" * 300], client="10.9.9.2", peer="127.0.0.1")  # another forwarded name
        assert status == 503 and "this client (127.0.0.1)" in answer["body"]["error"]["message"]
        release.set()


async def test_the_servers_client_share_is_its_setting(tmp_path, backbone, caplog):
    """The setting reaches the server: an upload still arriving holds most of this client's share, so its next
    request is refused from its Content-Length, naming the share as enforced (never below one largest body), which
    the start says too."""
    limits = Limits(max_upload_bytes=2000, max_request_bytes=1000, max_buffered_bytes=8000, max_client_buffered_bytes=1)
    arrived, more = anyio.Event(), anyio.Event()

    async def trickle():  # 1800 bytes of an upload, then the rest once told
        part = b'--b\r\nContent-Disposition: form-data; name="bundle"; filename="a.safetensors"\r\n\r\n'
        yield part + b"x" * (1800 - len(part))
        arrived.set()
        await more.wait()
        yield b"x" * 100

    async with running_app(tmp_path, backbone, limits=limits) as c:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                headers = {**AUTH, "content-type": "multipart/form-data; boundary=b", "content-length": "1900"}
                tg.start_soon(lambda: c.post("/tasks", content=trickle(), headers=headers))
                await arrived.wait()
                await anyio.sleep(0.05)
                r = await c.post("/classify", content=b"y" * 300, headers={"content-type": "multipart/form-data"})
                assert r.status_code == 503 and "max_client_buffered_bytes=2000" in r.json()["error"]["message"]
                more.set()
    raised = [r.getMessage() for r in caplog.records if "max_client_buffered_bytes=1 is below" in r.getMessage()]
    assert raised and "may hold 2000 bytes" in raised[0], caplog.text


async def test_head_is_answered_as_get_without_a_body(tmp_path, backbone):
    """Load balancers probe with HEAD: the same status and headers as GET, no body, and no 405."""
    async with running_app(tmp_path, backbone) as c:
        for path, headers in [("/healthz", {}), ("/readyz", {}), ("/metrics", {}), ("/tasks", AUTH)]:
            got, head = await c.get(path, headers=headers), await c.head(path, headers=headers)
            assert (head.status_code, got.status_code) == (200, 200), path
            assert head.content == b"" and got.content, path
            assert head.headers["content-type"] == got.headers["content-type"], path
        assert (await c.head("/tasks")).status_code == 401  # the token is still needed
        assert set((await c.get("/healthz")).json()) == {"status", "degraded", "store_error", "store_writable"}
        assert (await c.head("/classify")).status_code == 405
        metrics = (await c.get("/metrics")).text  # counted as sent, as the access log shows them (an operator's)
        assert 'clipbank_requests_total{endpoint="/healthz",method="HEAD",status="200"} 1.0' in metrics
        assert 'clipbank_requests_total{endpoint="/healthz",method="GET",status="200"} 2.0' in metrics


async def test_a_large_body_to_a_path_or_method_no_route_takes_is_404_or_405_not_413(tmp_path, backbone):
    """A mistyped URL reads as a size problem if the body limit is checked first; the limits still hold."""
    body = b"x" * (2 * 1024 * 1024)  # over the 1 MiB of small bodies, under max_request_bytes
    limits = Limits(max_request_bytes=1024 * 1024)
    async with running_app(tmp_path, backbone, limits=limits) as c:
        r = await c.post("/clasify", content=body)
        assert r.status_code == 404 and r.json()["error"] == {
            "code": "not_found",
            "message": "no route for POST /clasify: the API's paths are listed at /docs",
        }
        for path in ("/classify/", "/tasks/"):  # was a 307 with an empty body, to the path without the slash
            r = await c.post(path, content=body, headers=AUTH)
            assert r.status_code == 404 and r.json()["error"]["message"] == (
                f"no route for POST {path} (without the trailing slash: {path[:-1]}): the API's paths are listed "
                "at /docs"
            )
        r = await c.put("/classify", content=body)
        assert r.status_code == 405 and r.json()["error"] == {
            "code": "method_not_allowed",
            "message": "/classify does not take PUT; it takes POST",  # and Allow says so
        }
        r = await c.put("/tasks", content=body, headers=AUTH)  # two routes take /tasks: both methods are named
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST", r.headers
        assert r.json()["error"]["message"] == "/tasks does not take PUT; it takes GET, HEAD, POST"
        r = await c.post("/classify", content=body)
        assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]["message"]
        assert r.json()["error"]["details"] == {"setting": "max_request_bytes", "limit": 1024 * 1024}  # to split by

        async def chunks():  # no declared length: refused as it is read, with the same details
            for _ in range(3):
                yield body[: 512 * 1024]

        r = await c.post("/classify", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "request body passed" in r.json()["error"]["message"]
        assert r.json()["error"]["details"] == {"setting": "max_request_bytes", "limit": 1024 * 1024}
        r = await c.post("/tasks/x/activate", content=body, headers=AUTH)
        assert (
            r.status_code == 413 and "1048576 bytes for this endpoint (not a setting)" in r.json()["error"]["message"]
        )


async def test_a_query_parameter_given_twice_is_refused_not_the_last_one_taken(tmp_path, backbone):
    """`POST /tasks?mode=inactive&mode=active` stored the upload *active* (the last value won), and
    `DELETE ...?purge=true&purge=false` did not purge: a 422 names the parameter, before any work."""
    async with running_app(tmp_path, backbone) as c:
        r = await c.post("/tasks?mode=inactive&mode=active", files={"bundle": ("b", b"x")}, headers=AUTH)
        assert r.status_code == 422 and r.json()["error"]["message"] == (
            "the query parameter mode is given more than once; give each once"
        )
        r = await c.delete("/tasks/t?purge=true&purge=false", headers=AUTH)
        assert r.status_code == 422 and "purge is given more than once" in r.json()["error"]["message"]
        r = await c.post("/classify", files=[("images", ("a.png", b"x"))], data={"labels[]": ["a", "b"]})
        assert r.status_code == 422 and r.json()["error"]["message"] == (
            "no field is named 'labels[]': repeat the field 'labels' instead"
        )
        two = [("bundle", ("a", b"x")), ("bundle", ("b", b"y"))]  # was 413 "more than one bundle per upload=1 files"
        r = await c.post("/tasks", files=two, headers=AUTH)
        assert r.status_code == 422 and r.json()["error"]["message"] == (
            "the file field 'bundle' is sent more than once: one bundle per upload"
        )


async def test_a_long_path_or_method_is_cut_in_the_error(tmp_path, backbone):
    """A 15 KB path came back whole in the 404's message (the docs say client values are cut)."""
    async with running_app(tmp_path, backbone) as c:
        r = await c.get("/" + "a" * 15_000)
        assert r.status_code == 404 and len(r.content) < 400, len(r.content)
        assert r.json()["error"]["message"].startswith("no route for GET /aaaa")
        r = await c.request("X" * 2000, "/classify")
        assert r.status_code == 405 and len(r.content) < 300, len(r.content)


def test_a_client_reset_while_an_early_answer_ends_is_no_traceback():
    """The client reset the connection as its early 413/401 was written: `write_eof` raised ENOTCONN, and the
    log got two tracebacks per such client (anyone could fill it through the open /classify)."""
    from service.protocol import GuardedH11Protocol

    class Reset:
        closed = False

        def can_write_eof(self) -> bool:
            return True

        def write_eof(self) -> None:
            raise OSError(107, "Transport endpoint is not connected")

        def close(self) -> None:
            self.closed = True

    protocol = object.__new__(GuardedH11Protocol)
    protocol.transport, protocol.loop = Reset(), None  # no timer may be started on a connection already gone
    protocol._linger()
    assert protocol.transport.closed and protocol._lingering


def test_a_token_in_the_query_stays_out_of_the_access_log():
    """`?token=<admin token>` is refused (401), but uvicorn's access line held the token in clear."""
    import time

    from service.server import SecretsOutOfAccessLog, without_secrets

    args = ("127.0.0.1:5", "GET", "/tasks?token=s3cret-admin-token&wait=all&api_key=k&x=1", "1.1", 401)
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None)
    assert SecretsOutOfAccessLog().filter(record)
    assert record.getMessage() == '127.0.0.1:5 - "GET /tasks?token=***&wait=all&api_key=***&x=1 HTTP/1.1" 401'
    plain = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "%s %s %s", ("a", "GET", "/healthz"), None)
    assert SecretsOutOfAccessLog().filter(plain) and plain.getMessage() == "a GET /healthz"
    assert without_secrets("%74oken=s&Sig=t&a=b&jwt&x=") == "%74oken=***&Sig=***&a=b&jwt&x="  # as the app reads names
    started = time.perf_counter()
    # a regular expression backtracked on this (0.23 s for 16 KB, quadratic, on the event loop): about 80 s here
    without_secrets("key" * 100_000)
    assert time.perf_counter() - started < 5  # linear: milliseconds


def test_serve_installs_the_access_log_filter(tmp_path, monkeypatch):
    import uvicorn

    from service.server import serve

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    access = logging.getLogger("uvicorn.access")
    monkeypatch.setattr(access, "filters", [])
    assert serve(ServeConfig(admin_token="a" * 20, store=str(tmp_path / "store"), device="cpu")) == 0
    assert [type(f).__name__ for f in access.filters] == ["SecretsOutOfAccessLog", "QuietProbes"]


@pytest.mark.parametrize(
    "path, status, level, kept",
    [
        ("/readyz", 200, logging.INFO, False),
        ("/healthz", 200, logging.INFO, False),
        ("/metrics?x=1", 200, logging.INFO, False),
        ("/readyz", 503, logging.INFO, True),  # a failing probe is worth a line
        ("/classify", 200, logging.INFO, True),
        ("/readyz", 200, logging.DEBUG, True),
    ],
)
def test_probes_answered_200_leave_no_access_line_unless_debugging(path, status, level, kept):
    """An outside check's: the container's health check wrote an access line every 30 s."""
    from service.server import QuietProbes

    access = logging.getLogger("uvicorn.access")
    before = access.level
    access.setLevel(level)  # setLevel, which clears the logger's cache of isEnabledFor
    try:
        args = ("127.0.0.1:5", "GET", path, "1.1", status)
        record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None)
        assert QuietProbes().filter(record) is kept
    finally:
        access.setLevel(before)


async def test_the_body_rate_floor_charges_the_clients_waits_not_the_apps():
    """min_body_rate: a client dripping its body gets 408 although no single gap reaches read_timeout; an app that
    takes its time between reads of a body that came at once is not charged for it."""
    import json

    from fastapi import FastAPI

    from service.errors import install_handlers
    from service.middleware import BodyLimit

    async def app(scope, receive, send):  # reads slowly: a pause before each read
        while True:
            await asyncio.sleep(0.15)
            if not (await receive()).get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    inner = FastAPI()
    install_handlers(inner)
    inner.mount("/", app)
    limited = BodyLimit(inner, lambda method, path: (10**6, "max_request_bytes"), read_timeout=0.2, min_rate=1000)

    async def post(pieces: list[bytes], gaps: list[float]) -> tuple[int, bytes, int]:
        """The status and body of an answer to `pieces`, each sent its gap after the app asks for it, and how
        many pieces were left unsent."""
        sent: list[dict] = []
        left = [{"type": "http.request", "body": b, "more_body": i < len(pieces) - 1} for i, b in enumerate(pieces)]
        waits = iter(gaps)

        async def receive():
            await asyncio.sleep(next(waits))
            return left.pop(0)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/x", "headers": [], "query_string": b""}
        await limited({**scope, "root_path": "", "raw_path": b"/x"}, receive, send)
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return sent[0]["status"], body, len(left)

    assert (await post([b"x"] * 6, [0.0] * 6))[:2] == (200, b"ok")  # 6 reads, 0.9 s, past read_timeout + 6 bytes
    status, body, _ = await post([b"x"] * 6, [0.1] * 6)  # each gap under read_timeout; 0.1 s a byte is 10 bytes/s
    assert status == 408, body
    said = json.loads(body)["error"]["message"]
    assert "too slowly: min_body_rate=1000 bytes/s past read_timeout_seconds=0.2" in said
    assert "at most 0.4 s can be saved up (2 bytes in 0.2s)" in said
    # A security check: 16 clients each sent 64 MiB at once, then a byte every 20 s: they had earned 18 hours of
    # waiting, held max_buffered_bytes, and every /classify got 503. What a client saves up is now 2 read_timeouts.
    status, body, unsent = await post([b"x" * 100_000] + [b"x"] * 8, [0.0] + [0.15] * 8)  # 100_000 bytes: 100 s
    assert status == 408 and unsent > 4, body  # 0.4 s saved: the third drip of 0.15 s came too late
    assert (await post([b"x" * 100_000] + [b"x"] * 8, [0.0] + [0.01] * 8))[:2] == (200, b"ok")  # dripped quickly


async def test_a_too_large_body_without_the_token_is_401_not_413(tmp_path, backbone):
    """An anonymous client declaring a 1 TB upload got 413 with the limit's setting and value: it learned the
    server's limits, and not that it needed a token. The token is now checked first; with it, the 413 stays."""
    huge = {"Content-Length": str(10**12), "Content-Type": "multipart/form-data; boundary=x"}
    async with running_app(tmp_path, backbone, classify_token="classify-token-0123456789") as c:
        for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": "Basic abc"}):
            r = await c.post("/tasks", headers={**huge, **headers}, content=b"")
            assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized"), r.text
            assert "max_upload_bytes" not in r.text and r.headers["WWW-Authenticate"] == "Bearer"
            r = await c.post("/classify", headers={**huge, **headers}, content=b"")  # its own token, when set
            assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized"), r.text
        r = await c.post("/tasks", headers={**huge, **AUTH}, content=b"")
        assert (r.status_code, r.json()["error"]["details"]["setting"]) == (413, "max_upload_bytes"), r.text
        for first, then in ((AUTH["Authorization"], "Bearer wrong"), ("Bearer wrong", AUTH["Authorization"])):
            twice = [*huge.items(), ("Authorization", first), ("Authorization", then)]  # the first counted: refused
            r = await c.post("/tasks", headers=twice, content=b"")
            assert r.status_code == 400 and "more than once" in r.json()["error"]["message"], r.text
        r = await c.post("/tasks/x/activate", headers={**huge, **AUTH}, content=b"")
        assert r.status_code == 413, r.text  # a route's small body: not a setting, still refused
        r = await c.post("/nowhere", headers=huge, content=b"")
        assert r.status_code == 404, r.text  # no route: no token to ask for
    async with running_app(tmp_path / "open", backbone) as c:  # /classify without a classify token: open
        r = await c.post("/classify", headers=huge, content=b"")
        assert (r.status_code, r.json()["error"]["details"]["setting"]) == (413, "max_request_bytes"), r.text


async def test_uploads_past_their_bodies_run_one_at_a_time(tmp_path, backbone, monkeypatch):
    """A security check: two 248 MB uploads at once took the server from 1.1 to 2.7 GB (each one's parse, trial
    run and gate took 3.4x its bytes). Past its body, an upload now waits for the one before it."""
    import threading
    import time

    from model_store.store_base import PutResult

    running, most = [0], [0]
    lock = threading.Lock()

    def upload(data, activate=True, force=False, shadow=False):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return PutResult(task="t", version=1, bundle_id="0" * 64, experts_added=0, generation=0)

    async with running_app(tmp_path, backbone) as c:
        monkeypatch.setattr(c.app.state.service.registry, "upload", upload)
        files = {"bundle": ("b.safetensors", b"x" * 1000)}
        answers = await asyncio.gather(*(c.post("/tasks", files=files, headers=AUTH) for _ in range(3)))
    assert [r.status_code for r in answers] == [201] * 3 and most[0] == 1


async def test_answers_a_client_has_not_read_count_as_held():
    """An outside check: 150 connections that never read their 15 MB answers held 0.9 GB, and nothing bounded
    answers. An answer's body now counts as held while its send waits on the client (a full socket buffer), so
    past `max_buffered_bytes` new requests get 503, and the bytes are given back once the client takes them."""
    from fastapi import FastAPI

    from service.middleware import BodyLimit

    taken = anyio.Event()

    async def app(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a" * 1200})

    inner = FastAPI()
    inner.mount("/", app)
    limited = BodyLimit(inner, lambda method, path: (1000, "max_request_bytes"), max_buffered=1350)
    scope = {"type": "http", "method": "POST", "path": "/classify", "headers": [], "query_string": b""}
    scope |= {"root_path": "", "raw_path": b"/classify", "client": ("10.0.0.1", 40000)}

    async def receive():
        return {"type": "http.request", "body": b"x" * 100, "more_body": False}

    async def slow_reader(message):
        if message["type"] == "http.response.body":
            await taken.wait()  # the client does not read: the send waits

    async with anyio.create_task_group() as tg:
        tg.start_soon(limited, dict(scope), receive, slow_reader)
        await anyio.sleep(0.05)
        assert limited.held == 1300  # its body (100) and its unread answer (1200)
        sent: list = []

        async def record(message):
            sent.append(message)

        await limited({**scope, "client": ("10.0.0.2", 40000)}, receive, record)
        assert sent[0]["status"] == 503 and b"unread answers" in sent[-1]["body"]
        taken.set()
    assert limited.held == 0


def test_headers_that_read_two_ways_are_refused():
    """An outside check: with two Authorization headers the first won, with two X-Min-Generation the last, two
    Content-Types gave "not valid JSON"; a chunked body in HTTP/1.0 (which has no chunked coding) was read."""
    from service.middleware import _header_problem

    def scope(*headers: tuple[bytes, bytes], version: str = "1.1") -> dict:
        return {"type": "http", "headers": list(headers), "http_version": version}

    for name in (b"Authorization", b"content-type", b"X-Min-Generation"):
        status, code, message = _header_problem(scope((name, b"a"), (b"host", b"x"), (name.lower(), b"b")))
        assert (status, code) == (400, "bad_request") and "more than once" in message, name
    assert _header_problem(scope((b"transfer-encoding", b"chunked"), version="1.0"))[0] == 400
    assert _header_problem(scope((b"transfer-encoding", b"chunked"))) is None
    assert _header_problem(scope((b"authorization", b"a"), (b"accept", b"x"), (b"accept", b"y"))) is None
    assert _header_problem(scope((b"x-request-id", b"a"), (b"x-request-id", b"b"))) is None  # a proxy appends its own


def test_a_classify_token_equal_to_the_admin_token_is_refused_and_top_k_is_digits():
    """An outside check: the same token for both started silently, giving every classify client admin rights; a
    form's top_k of "1_0" was read as 10."""
    from pydantic import ValidationError

    from service.config import ServeConfig
    from service.schemas import ClassifyOptions

    token = "t" * 20
    with pytest.raises(ValueError, match="classify_token must differ from admin_token"):
        ServeConfig(admin_token=token, classify_token=token)
    ServeConfig(admin_token=token, classify_token="c" * 20)
    for bad in ("1_0", " 1 ", "+1", "١"):
        with pytest.raises(ValidationError, match="top_k is a whole number"):
            ClassifyOptions(top_k=bad)
    assert ClassifyOptions(top_k="3").top_k == 3
    with pytest.raises(ValidationError, match="top_k must be >= 1, got '-1'"):  # "not written in digits" before
        ClassifyOptions(top_k="-1")


async def test_kept_alive_answers_say_how_long_an_idle_connection_stays_open():
    """An outside check's Node client: fetch kept idle sockets as long as the server (5 s) and a POST sent on one
    as the server closed it failed with EPIPE, no status. The hint lets such clients drop them first."""
    import socket

    import uvicorn

    from service.protocol import guarded_protocol

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    listening = socket.create_server(("127.0.0.1", 0))
    protocol = guarded_protocol(10.0, 16)
    config = uvicorn.Config(app, lifespan="off", timeout_keep_alive=5, http=protocol, log_level="warning")
    server = uvicorn.Server(config)

    def head(request: bytes) -> bytes:
        with socket.create_connection(listening.getsockname(), timeout=10) as sock:
            sock.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer and (chunk := sock.recv(4096)):
                answer += chunk
        return answer.partition(b"\r\n\r\n")[0].lower()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(server.serve, [listening])
        while not server.started:
            await anyio.sleep(0.01)
        heads = [
            await anyio.to_thread.run_sync(head, request)
            for request in (
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Close\r\n\r\n",  # the review's: uvicorn reads "close" only
                b"GET / HTTP/1.0\r\n\r\n",
            )
        ]
        server.should_exit = True
    kept, closed, closed_too, old = heads
    assert kept.startswith(b"http/1.1 200") and b"\r\nkeep-alive: timeout=5" in kept, kept
    for answer in (closed, closed_too):
        assert b"keep-alive" not in answer and b"connection: close" in answer, answer
    assert old.startswith(b"http/1.1 200") and b"keep-alive" not in old, old


def test_the_protocols_own_errors_name_their_code_in_a_header_too():
    """The review's: the OpenAPI document declares X-Clipbank-Error on every 503, and the full connection table's
    503 (written by the protocol, outside the app) had none."""
    from service.protocol import raw_error

    head = raw_error(503, "overloaded", "full", ("retry-after: 1",)).partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"HTTP/1.1 503 Service Unavailable" and b"x-clipbank-error: overloaded" in head, head

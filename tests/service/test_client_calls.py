"""The Python client as an integrating user calls it: retries, process pools, files sent twice, None for defaults,
and the `clipbank tasks` commands that change a server's tasks (found by an outside check of the client)."""

from __future__ import annotations

import concurrent.futures
import io
import json
import re
import time
from copy import deepcopy

import httpx
import pytest

from clipbank.cli import main
from service.client import ClipbankClient, ClipbankHTTPError
from tests.helpers import client_on

URL = ["--url", "http://srv", "--token", "t" * 20]

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 40
ROUTE = {"task": None, "version": None, "bundle_id": None, "score": None, "threshold": None}
OK = {"results": [{"labels": [{"label": "cat", "score": 0.9}], "route": ROUTE}], "timing": {}}


def _overloaded_then_ok(failures: int, calls: list):
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path))
        if len(calls) <= failures:
            error = {"error": {"code": "overloaded", "message": "the queue is full", "details": None}}
            return httpx.Response(503, json=error, headers={"Retry-After": "0"})
        return httpx.Response(200, json=OK)

    return handler


def test_retries_send_a_request_that_changes_nothing_again_after_a_503_that_says_when(monkeypatch):
    calls: list = []
    client_on(monkeypatch, _overloaded_then_ok(2, calls))
    with ClipbankClient("http://srv", retries=2) as c:
        assert c.classify([PNG]) == OK
    assert calls == [("POST", "/classify")] * 3
    calls.clear()
    with ClipbankClient("http://srv") as c, pytest.raises(ClipbankHTTPError) as e:  # the default: no retry
        c.classify([PNG])
    assert e.value.code == "overloaded" and e.value.retry_after == 0 and len(calls) == 1
    calls.clear()
    with ClipbankClient("http://srv", retries=5) as c, pytest.raises(ClipbankHTTPError):
        c.push(PNG)  # a change is never sent twice: it may have landed
    with ClipbankClient("http://srv", retries=5) as c, pytest.raises(ClipbankHTTPError):
        c.ready()  # a probe asks for the state now
    assert calls == [("POST", "/tasks"), ("GET", "/readyz")]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="retries is a count"):
            ClipbankClient("http://srv", retries=bad)


def test_the_cli_retries_by_default(monkeypatch, tmp_path, capsys):
    calls: list = []
    client_on(monkeypatch, _overloaded_then_ok(3, calls))
    (tmp_path / "a.png").write_bytes(PNG)
    assert main(["classify", str(tmp_path / "a.png"), "--url", "http://srv", "--json"]) == 0
    assert len(calls) == 4
    calls.clear()
    assert main(["classify", str(tmp_path / "a.png"), "--url", "http://srv", "--retries", "0"]) == 3  # try later
    assert "overloaded" in capsys.readouterr().err and len(calls) == 1


def test_exit_codes_tell_a_refusal_from_a_usage_error_from_a_server_away_and_json_gets_the_error(
    monkeypatch, tmp_path, capsys
):
    """An outside check: every failure exited 2, and `--json` printed nothing on a 409, so a deploy script could
    not tell the gate's refusal from a server down. 1: refused (4xx); 2: usage or local; 3: no answer or a 5xx."""
    report = {"passed": False, "offences": ["it would take 98% of the images of task 'a'"]}

    def handler(request: httpx.Request) -> httpx.Response:
        error = {"code": "interference", "message": "task 'b' v1 was not activated", "details": report}
        return httpx.Response(409, json={"error": error})

    client_on(monkeypatch, handler)
    assert main(["tasks", "activate", "b", "1", *URL, "--json"]) == 1
    said = capsys.readouterr()
    assert json.loads(said.out)["error"] == {
        "status": 409,
        "code": "interference",
        **{k: v for k, v in {"message": "task 'b' v1 was not activated", "details": report}.items()},
    }
    assert "interference" in said.err
    (tmp_path / "b.safetensors").write_bytes(b"bundle")  # push took no --json, though the docs list it
    assert main(["push", str(tmp_path / "b.safetensors"), *URL, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "interference"
    assert main(["classify", str(tmp_path / "none.png"), *URL]) == 2  # a file that is not there
    assert "none.png" in capsys.readouterr().err
    # a 503 without Retry-After (a read-only store) only an operator can fix: refused, not "try later" (an SRE's)
    for code, headers, expected in (("store_not_writable", {}, 1), ("store_write_failed", {"Retry-After": "30"}, 3)):
        error = {"code": code, "message": "the store could not be written"}
        client_on(monkeypatch, lambda request, e=error, h=headers: httpx.Response(503, json={"error": e}, headers=h))
        assert main(["push", str(tmp_path / "b.safetensors"), *URL]) == expected, code
        assert code in capsys.readouterr().err

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    client_on(monkeypatch, refused)
    (tmp_path / "a.png").write_bytes(PNG)
    assert main(["classify", str(tmp_path / "a.png"), *URL, "--retries", "0", "--json"]) == 3
    out = json.loads(capsys.readouterr().out)  # one object: classify's own, with what was answered
    assert (
        out["error"]["code"] == "unreachable"
        and out["results"] == []
        and out["unanswered"] == [str(tmp_path / "a.png")]
    )


def test_a_refused_connection_is_tried_again_for_a_change_too(monkeypatch):
    """An outside check: retries did not cover a server restarting (its port closed for 7 s); a refused connection
    sent nothing, so every request may be sent again, a push too. A name that does not resolve is not retried."""
    waits: list = []
    calls: list = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) <= 2:
            raise httpx.ConnectError("[Errno 111] Connection refused")
        return httpx.Response(201, json={"task": "t", "version": 1, "bundle_id": "x" * 64})

    client_on(monkeypatch, handler)
    monkeypatch.setattr(time, "sleep", waits.append)
    with ClipbankClient("http://srv", retries=2) as c:
        assert c.push(PNG)["version"] == 1
    assert calls == ["/tasks"] * 3 and 1.0 <= waits[0] <= 1.25 and 2.0 <= waits[1] <= 2.5, (calls, waits)

    def unresolved(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    calls.clear()
    client_on(monkeypatch, unresolved)
    with ClipbankClient("http://srv", retries=3) as c, pytest.raises(ClipbankHTTPError) as e:
        c.classify([PNG])
    assert e.value.code == "unreachable" and calls == ["/classify"]

    calls.clear()  # a probe asks for the state now: a server down says so at once (it waited 3.3 s at retries=2)

    def down(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        raise httpx.ConnectError("[Errno 111] Connection refused")

    client_on(monkeypatch, down)
    with ClipbankClient("http://srv", retries=2) as c:
        for probe in (c.health, c.ready):
            with pytest.raises(ClipbankHTTPError) as e:
                probe()
            assert e.value.code == "unreachable" and "tries" not in e.value.message
        calls.clear()
        with pytest.raises(ClipbankHTTPError) as e:  # an outside check: "cannot reach" hid 3.3 s of retries
            c.tasks()
    assert calls == ["/tasks"] * 3 and e.value.code == "unreachable"
    assert re.search(r"Connection refused \(the last of 3 tries, over \d+\.\d s\)$", e.value.message), e.value.message


def _fails(_: int) -> None:
    raise ClipbankHTTPError(401, "unauthorized", "no token", {"why": 1}, retry_after=None)


def test_a_server_error_raised_in_a_process_pool_reaches_the_caller_as_itself():
    """It could not be unpickled (its __init__ takes three arguments): the pool broke instead."""
    copy = deepcopy(ClipbankHTTPError(503, "overloaded", "full", None, retry_after=1.0))  # __reduce__, as pickle
    assert (copy.status, copy.code, copy.message, copy.retry_after, str(copy)) == (
        503,
        "overloaded",
        "full",
        1.0,
        "HTTP 503 overloaded: full",
    )
    with concurrent.futures.ProcessPoolExecutor(1) as pool, pytest.raises(ClipbankHTTPError) as e:
        pool.submit(_fails, 0).result()
    assert e.value.code == "unauthorized" and e.value.details == {"why": 1}


def test_a_file_object_sent_twice_is_sent_whole_both_times(monkeypatch):
    """The second call (a retry by hand, or the same file twice in one list) sent 0 bytes: 422 "image is empty"."""
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.read())
        return httpx.Response(200, json=OK)

    client_on(monkeypatch, handler)
    f = io.BytesIO(b"head" + PNG)
    f.read(4)  # sent from where it stands, and left there
    with ClipbankClient("http://srv") as c:
        c.classify([f, f])
        c.classify([f])
    assert bodies[0].count(PNG) == 2 and bodies[1].count(PNG) == 1 and f.tell() == 4


def test_none_means_the_default_and_a_timeout_of_none_means_none(monkeypatch):
    sent: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = request.read().decode("latin-1")
        sent.append({k: body.count(f'name="{k}"') for k in ("labels", "task", "route")} | {"auto": "auto" in body})
        return httpx.Response(200, json=OK)

    client_on(monkeypatch, handler)
    with ClipbankClient("http://srv", timeout=None) as c:  # every call failed with a TypeError
        c.classify([PNG], labels=None, task=None, route=None)
    assert sent == [{"labels": 0, "task": 1, "route": 1, "auto": True}]  # task=None sent "" before: 404
    for bad in (0, -1, "60", True, float("nan")):
        with pytest.raises(ValueError, match="timeout is a number of seconds"):
            ClipbankClient("http://srv", timeout=bad)


def test_health_and_ready_ask_their_endpoints(monkeypatch):
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return httpx.Response(200, json={"status": "live"})

    client_on(monkeypatch, handler)
    with ClipbankClient("http://srv") as c:
        assert c.health() == {"status": "live"} and c.ready() == {"status": "live"}
    assert paths == ["/healthz", "/readyz"]


def test_what_the_client_refuses_before_sending(monkeypatch):
    client_on(monkeypatch, lambda request: pytest.fail("nothing is sent"))
    with ClipbankClient("http://srv") as c:
        with pytest.raises(TypeError, match="is a URL: the client sends image files"):
            c.classify(["https://example.com/a.png"])  # was FileNotFoundError 'https:/example.com/a.png'
        with pytest.raises(ValueError, match="at most 18 digits"):
            c.classify([PNG], min_generation=10**18)  # was sent, and refused by the server with a 400
        for one in (io.BytesIO(PNG), bytearray(PNG), memoryview(PNG), {"a.png": PNG}):  # a file went line by line
            with pytest.raises(TypeError, match="images and labels are lists"):
                c.classify(one, labels=["a", "b"])
        with pytest.raises(TypeError, match="images and labels are lists"):
            c.classify([PNG], labels={"a": 1, "b": 2})  # a dict was its keys
    with pytest.raises(RuntimeError, match="this ClipbankClient is closed"):
        c.tasks()


def test_tasks_activate_and_deactivate_go_through_the_server(monkeypatch, capsys):
    calls: list = []
    info = {"task": "cars", "active_version": 2, "generation": 9, "gate": None}

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path, dict(request.url.params), request.read()))
        if request.method == "GET":  # the task as it was, to compare the activated version with
            return httpx.Response(200, json={"shadow_version": 3, **info, "versions": []})
        if request.method == "DELETE":
            kept = {"1": ["vans"]} if request.url.params["purge"] == "true" else {}
            return httpx.Response(200, json={"task": "cars", "purged_blobs": 1, "kept": kept, "generation": 10})
        forced = {"offences": ["it would take 5.8% of the images of task 'vans' (limit 2.0%)"]}
        return httpx.Response(200, json={**info, "gate": forced if request.url.params["force"] == "true" else None})

    client_on(monkeypatch, handler)
    url = ["--url", "http://srv", "--token", "t" * 20]
    assert main(["tasks", "activate", "cars", "2", "--force", "--wait-all", *url]) == 0
    assert calls[-1][:3] == ("POST", "/tasks/cars/activate", {"force": "true", "wait": "all"})
    assert json.loads(calls[-1][3]) == {"version": 2}
    captured = capsys.readouterr()
    assert captured.out == "task cars: version 2 is active (generation 9)\n"
    assert "forced past the gate: it would take 5.8%" in captured.err
    assert main(["tasks", "activate", "cars", "2", *url]) == 0
    assert "it was active already: nothing changed" in capsys.readouterr().err
    assert main(["tasks", *url, "deactivate", "cars", "--purge"]) == 0
    assert calls[-1][:3] == ("DELETE", "/tasks/cars", {"purge": "true"})
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "task cars: deactivated and purged, 1 blob(s) deleted; it stays listed, with the versions other tasks' "
        "experts need",
        "  kept version 1: task vans uses its experts",
    ]
    assert "task cars: v3, in shadow, was purged too" in captured.err
    info["shadow_version"] = 1  # kept: other tasks use its experts (the review's)
    assert main(["tasks", *url, "deactivate", "cars", "--purge"]) == 0
    assert "in shadow, was purged too" not in capsys.readouterr().err
    del info["shadow_version"]
    assert main(["tasks", "deactivate", "cars", "--json", *url]) == 0
    assert json.loads(capsys.readouterr().out)["generation"] == 10
    answers = {"task": "cars", "purged_blobs": 0, "kept": {}, "generation": 11, "was_active": False}
    client_on(monkeypatch, lambda request: httpx.Response(200, json=answers))
    assert main(["tasks", *url, "deactivate", "cars", "--purge"]) == 0  # an outside check: "deactivated" it said
    assert capsys.readouterr().out == "task cars: purged (it had no active version), 0 blob(s) deleted\n"


def test_a_request_a_dead_replica_broke_is_sent_again_but_a_change_never(monkeypatch):
    """An outside check of Ray Serve: a replica killed under load answered its requests with the proxy's bare
    `text/plain` 500, which `retries=3` raised (1 of 1,806 calls). Such a 500, a 502/503/504 that is not
    clipbank's, and a connection broken mid-request are now retried for what changes nothing; clipbank's own 500
    and every change are not."""
    calls: list = []
    waits: list = []
    failures = [
        httpx.Response(500, text="Internal Server Error", headers={"X-Request-ID": "rid-1, rid-1"}),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.Response(502, text="<html>Bad Gateway</html>"),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.method, request.url.path))
        if len(calls) <= len(failures):
            failure = failures[len(calls) - 1]
            if isinstance(failure, Exception):
                raise failure
            return failure
        return httpx.Response(200, json=OK)

    client_on(monkeypatch, handler)
    monkeypatch.setattr("service.client.time.sleep", waits.append)
    with ClipbankClient("http://srv", retries=3) as c:
        assert c.classify([PNG]) == OK
    assert calls == [("POST", "/classify")] * 4
    assert len(waits) == 3 and 0.25 <= waits[0] <= 0.32 and 0.5 <= waits[1] <= 0.63 and 1.0 <= waits[2] <= 1.25
    calls.clear()
    with ClipbankClient("http://srv", retries=3) as c, pytest.raises(ClipbankHTTPError) as e:
        c.push(PNG)  # a change may have landed: never sent twice
    assert calls == [("POST", "/tasks")] and e.value.status == 500
    assert e.value.request_id == "rid-1"  # an id sent twice (clipbank on Ray before 2026-12-07), joined by httpx
    own = {"error": {"code": "internal_error", "message": "a bug (request id rid-2)", "details": None}}
    client_on(monkeypatch, lambda request: calls.append(request.url.path) or httpx.Response(500, json=own))
    calls.clear()
    with ClipbankClient("http://srv", retries=3) as c, pytest.raises(ClipbankHTTPError) as e:
        c.classify([PNG])  # clipbank's own 500 is a bug: the same request would meet it again
    assert e.value.code == "internal_error" and calls == ["/classify"]


def test_a_classify_can_carry_the_callers_request_id(monkeypatch):
    """An app could not trace its request into the server's log: the client sent no X-Request-ID of its own."""
    seen: list = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("x-request-id"))
        return httpx.Response(200, json=OK)

    client_on(monkeypatch, handler)
    with ClipbankClient("http://srv") as c:
        c.classify([PNG], request_id="order-17:item.3")
        c.classify([PNG])
        for bad in ("has space", "x" * 129, 17):
            with pytest.raises(ValueError, match="request_id is 1 to 128 characters"):
                c.classify([PNG], request_id=bad)
    assert seen == ["order-17:item.3", None]


def test_shadow_and_activation_say_what_the_version_would_replace_and_what_a_shadow_replaced(
    monkeypatch, tmp_path, capsys, backbone
):
    """An outside check: a v3 trained on 3 of 6 classes, pushed in shadow (the safer way the README shows) and then
    promoted with `tasks activate`, was never said to lack classes, which a plain push says; pushing it in shadow
    over v2 dropped v2's shadow figures without a word; and activating said nothing of the gate it passed."""
    from model_store.bank import empty_bank
    from tests.helpers import random_bundle

    bundle = tmp_path / "v3.safetensors"
    bundle.write_bytes(random_bundle(empty_bank(backbone), "greek", seed=1, version=3))
    v1 = {"version": 1, "classes": ["alpha", "beta", "gamma"], "metrics": {}}
    v3 = {"version": 3, "classes": ["alpha"], "metrics": {}}
    state = {"active_version": 1, "shadow_version": 2}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/tasks":
            state["shadow_version"] = 3
            answer = {"task": "greek", "version": 3, "bundle_id": "b" * 64, "generation": 5, "gate": None}
            return httpx.Response(201, json=answer)
        if request.method == "POST":  # the activation
            state["active_version"] = json.loads(request.content)["version"]
            gate = {
                "passed": True,
                "stolen": {"latin": 0.004},
                "zero_shot_captured": 0.012,
                "offences": [],
                "unmeasured": ["old"],
            }
            answer = {"task": "greek", "active_version": state["active_version"], "generation": 6, "gate": gate}
            return httpx.Response(200, json=answer)
        return httpx.Response(200, json={"task": "greek", **state, "versions": [v1, v3]})

    client_on(monkeypatch, handler)
    assert main(["push", str(bundle), "--shadow", *URL]) == 0
    err = capsys.readouterr().err
    assert "task greek v3 would replace v1 and lacks 2 of its 3 classes (beta, gamma)" in err, err
    assert "their images would be answered over v3's classes" in err and "Roll back" not in err
    assert "v2 was in shadow and is no more: its shadow figures are gone" in err
    assert main(["tasks", "activate", "greek", "3", *URL]) == 0
    out = capsys.readouterr()
    assert out.out == "task greek: version 3 is active (generation 6)\n"
    assert "the interference gate passed it: it would take at most 0.4% of the images of task latin, 1.2%" in out.err
    assert "(not measured on old: no probes)" in out.err
    assert "task greek v3 replaces v1 and lacks 2 of its 3 classes" in out.err
    assert "`clipbank tasks activate greek 1`" in out.err and "train a version on images of every class" in out.err

    # a rollback to the older version: no training advice for it (it said "train v1 with --store")
    state["active_version"] = 3
    v1["classes"], v3["classes"] = ["alpha"], ["alpha", "beta", "gamma"]
    v1["metrics"] = {"train_classes": 1.0}  # trained on images of all it answers: no word of it
    assert main(["tasks", "activate", "greek", "1", *URL]) == 0
    err = capsys.readouterr().err
    assert "v1 is older than v3: it was trained before those classes" in err, err
    assert "train a version" not in err and "Roll back" not in err and "was trained on images of" not in err, err

    # a new version over every class, trained on images of the new ones only: its old classes are forgotten
    # (an outside check: 88% -> 25% on activation, and nothing said)
    state["active_version"] = 1
    v1["classes"], v3["classes"] = ["alpha", "beta"], ["alpha", "beta", "gamma"]
    v3["metrics"] = {"val_accuracy": 0.95, "val_classes": 1.0, "train_classes": 1.0}
    assert main(["tasks", "activate", "greek", "3", *URL]) == 0
    err = capsys.readouterr().err
    assert "task greek v3 was trained on images of 1 of its 3 classes: the others are answered by experts" in err


def test_push_says_when_a_version_gets_little_of_its_own_traffic(monkeypatch, tmp_path, capsys):
    """An outside check: a task trained on images another task claims was pushed with `self_claim` 0.0 and nothing
    said it would get no traffic; a rollback kept another task's images its serving version had taken already."""
    gate = {
        "task": "b",
        "version": 1,
        "self_claim": 0.0,
        "own_routes": {"digits": 0.977, "zero-shot": 0.023},
        "already_taken": {"a": 0.98},
        "zero_shot_already": 0.5,
        "limits": {"max_stolen": 0.02, "max_zero_shot_captured": 0.05},
        "passed": True,
        "offences": [],
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(404, json={"error": {"code": "task_not_found", "message": "no", "details": None}})
        return httpx.Response(201, json={"task": "b", "version": 1, "bundle_id": "x" * 64, "gate": gate})

    client_on(monkeypatch, handler)
    bundle = tmp_path / "b.safetensors"
    bundle.write_bytes(b"x" * 100)
    assert main(["push", str(bundle), *URL]) == 0
    err = capsys.readouterr().err
    assert "task b v1 is routed only 0.0% of its own probe images (the rest: digits 97.7%, zero-shot 2.3%)" in err
    assert "keeps 98.0% of the images of task a" in err and "keeps 50.0% of the generic images" in err
    gate.update(self_claim=0.93, already_taken={}, zero_shot_already=0.01)
    assert main(["push", str(bundle), *URL]) == 0
    assert "routed only" not in (err := capsys.readouterr().err) and "keeps" not in err


def test_classify_sends_more_images_than_the_server_takes_as_several_requests(monkeypatch):
    """An outside check: `c.classify(200 files)` got a 413 max_images (64), and every application had to split its
    batches as the CLI does. The client now does: the server's max_images, half as many for a body, pixels or
    answer over its limit; results joined in order; an image's error numbered in the whole call."""
    sizes: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        n = request.read().count(b'name="images"')
        sizes.append(n)
        if n > 64:
            error = {"code": "limit_exceeded", "message": "too many", "details": {"setting": "max_images", "limit": 64}}
            return httpx.Response(413, json={"error": error})
        if b"BROKEN" in request.read():  # not hex: b"bad" was in the random multipart boundary 1 time in ~140
            error = {"code": "bad_image", "message": "image 1 ('x') is broken", "details": {"image": 1}}
            return httpx.Response(422, json={"error": error})
        return httpx.Response(200, json={"results": [{"labels": [], "route": ROUTE, "n": n}] * n, "timing": {}})

    client_on(monkeypatch, handler)
    with ClipbankClient("http://srv") as c:
        out = c.classify([PNG] * 150)
        assert sizes == [150, 64, 64, 22] and len(out["results"]) == 150 and out["requests"] == 3
        sizes.clear()
        with pytest.raises(ClipbankHTTPError) as e:
            c.classify([PNG] * 65 + [PNG + b"BROKEN"] + [PNG] * 3)
        assert e.value.details == {"image": 65} and sizes == [64, 5]  # the server's max_images, learnt
        assert e.value.message == "image 65 ('x') is broken"  # numbered in the call, as its details (a review)
        with pytest.raises(ClipbankHTTPError, match="too many"):
            c.classify([PNG] * 70, route="per-request")  # one decision for all: not split behind its back


def test_push_of_an_image_is_a_type_error_before_anything_is_sent(monkeypatch):
    """An outside check: `push(PIL image)` uploaded it as a PNG, and the server answered 422 bundle_not_safetensors."""
    from PIL import Image

    calls: list = []
    client_on(monkeypatch, _overloaded_then_ok(0, calls))
    with ClipbankClient("http://srv", token="s" * 20) as c, pytest.raises(TypeError, match="a bundle is a file's path"):
        c.push(Image.new("RGB", (2, 2)))
    from training.trainer import TrainResult

    for bundle, said in ((None, "not NoneType$"), (TrainResult(b"x", {}), r"not TrainResult: push\(result.bundle\)")):
        with pytest.raises(TypeError, match="a bundle is a file's path, its bytes or an open file, " + said):
            c.push(bundle)  # "an image is a path, ..." before (an outside check)
    assert calls == [] and repr(c) == "ClipbankClient('http://srv', token=set, timeout=60.0, retries=0)"


def test_tasks_says_what_the_server_still_serves_when_the_store_cannot_be_listed(monkeypatch, capsys):
    """An outside check: with the store moved or replaced, `clipbank tasks` said only the store's error."""
    served = {"serving": [{"task": "a", "version": 2, "bundle_id": "x" * 64}], "generation": 7}

    def handler(request: httpx.Request) -> httpx.Response:
        error = {"code": "store_damaged", "message": "index.json is gone", "details": served}
        return httpx.Response(503, json={"error": error})

    client_on(monkeypatch, handler)
    assert main(["tasks", *URL]) == 1  # a damaged store: an operator must act (no Retry-After)
    err = capsys.readouterr().err
    assert "the server still serves (generation 7): a v2" in err and "index.json is gone" in err


def test_skip_bad_answers_the_good_images_in_place_and_keeps_the_requests_already_answered(monkeypatch, tmp_path):
    """An outside check: one bad image in 150 raised, losing the answers of the requests sent before it, and each
    of 6 bad images cost a round trip re-sending all the others."""
    import re as regex

    sent: list[list[str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        names = regex.findall(rb'name="images"; filename="([^"]+)"', request.content)
        names = [n.decode() for n in names]
        sent.append(names)
        if len(names) > 4:
            error = {"code": "too_many_images", "message": "x", "details": {"setting": "max_images", "limit": 4}}
            return httpx.Response(413, json={"error": error})
        for i, name in enumerate(names):
            if name.startswith("bad"):
                error = {
                    "code": "bad_image",
                    "message": f"image {i} ('{name}') is not an image",
                    "details": {"image": i},
                }
                return httpx.Response(422, json={"error": error})
        results = [{"labels": [{"label": name, "score": 1.0}], "route": {}} for name in names]
        return httpx.Response(200, json={"results": results, "timing": {"n": len(names)}})

    client_on(monkeypatch, handler)
    names = ["a", "bad1", "b", "c", "d", "e", "bad2", "f", "g"]
    images = [(tmp_path / n) for n in names] + [tmp_path / "missing.png"]
    for path in images[:-1]:
        path.write_bytes(PNG)
    with ClipbankClient("http://srv") as c:
        out = c.classify(images, ["x"], skip_bad=True)
        assert [r["labels"][0]["label"] if "labels" in r else r["error"]["code"] for r in out["results"]] == [
            "a",
            "bad_image",
            "b",
            "c",
            "d",
            "e",
            "bad_image",
            "f",
            "g",
            "unreadable",
        ]
        assert out["results"][1]["error"] == {
            "status": 422,
            "code": "bad_image",
            "message": "image 'bad1' is not an image",
        }
        assert "FileNotFoundError" in out["results"][9]["error"]["message"] and out["requests"] == 2
        # the first request of 4 was refused for bad1 and sent again without it; the next after it alone
        assert sent[1:] == [["a", "bad1", "b", "c"], ["a", "b", "c", "d"], ["e", "bad2", "f", "g"], ["e", "f", "g"]]
        with pytest.raises(ClipbankHTTPError) as e:  # without it: raised, numbered in the whole call
            c.classify(images[:-1], ["x"])
    assert e.value.details["image"] == 1 and e.value.message.startswith("image 1 ")
    with ClipbankClient("http://srv") as c, pytest.raises(FileNotFoundError):
        c.classify(images[-1:], ["x"])


def test_a_split_calls_answers_must_have_a_result_per_image_and_a_4xx_after_a_retry_is_said_as_it_is(monkeypatch):
    """The review: a split call answered with too few results ended in a bare zip() ValueError; a 422 that
    followed a retried 503 got "(the last of 2 tries ...)", which then showed in a skipped image's message."""
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.content.count(b'name="images"'))
        if calls[-1] > 2:
            error = {"code": "too_many_images", "message": "x", "details": {"setting": "max_images", "limit": 2}}
            return httpx.Response(413, json={"error": error})
        return httpx.Response(200, json=OK)  # one result, whatever was sent

    client_on(monkeypatch, handler)
    with ClipbankClient("http://srv") as c, pytest.raises(ClipbankHTTPError) as e:
        c.classify([PNG] * 4)
    assert e.value.code == "not_clipbank" and "answered 4 image(s) with 2 result(s)" in e.value.message
    client_on(monkeypatch, lambda request: httpx.Response(200, json={"results": {"cat": 0.9}, "timing": {}}))
    with ClipbankClient("http://srv") as c, pytest.raises(ClipbankHTTPError) as e:
        c.classify([PNG], skip_bad=True)
    assert e.value.code == "not_clipbank" and "not a list" in e.value.message
    calls.clear()

    def busy_then_bad(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            error = {"code": "overloaded", "message": "full", "details": None}
            return httpx.Response(503, json={"error": error}, headers={"Retry-After": "0"})
        error = {"code": "bad_image", "message": "image 0 ('a') is not an image", "details": {"image": 0}}
        return httpx.Response(422, json={"error": error})

    client_on(monkeypatch, busy_then_bad)
    with ClipbankClient("http://srv", retries=2) as c:
        out = c.classify([PNG], skip_bad=True)
        assert out["results"] == [
            {"error": {"status": 422, "code": "bad_image", "message": "image 'a' is not an image"}}
        ]


def test_a_413_naming_max_batch_or_max_images_splits_to_its_limit_and_others_do_not():
    """The 413s that carry `{setting, limit}`: the client sends requests of that many images for the image
    counts, half as many for the byte and pixel limits, and gives up on the rest (fewer images cannot help)."""
    from service.client_wire import ClipbankHTTPError, smaller_batch

    def said(setting: str, limit: int) -> ClipbankHTTPError:
        return ClipbankHTTPError(413, "limit_exceeded", "over", {"setting": setting, "limit": limit})

    assert smaller_batch(said("max_images", 16), 64) == 16 and smaller_batch(said("max_batch", 8), 64) == 8
    assert smaller_batch(said("max_request_pixels", 10**6), 64) == 32
    assert smaller_batch(said("max_labels", 8), 64) is None and smaller_batch(said("max_images", 64), 64) is None


def test_yes_no_options_take_only_true_or_false_and_nothing_is_sent_otherwise(monkeypatch):
    """An outside check: `push(activate="false")` put the version live, `delete(purge="yes")` forgot the task and
    deleted its blobs (Python's truth, or the server's reading of "yes"); only `match_labels` was checked."""
    import numpy as np

    sent: list = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append((request.url.path, dict(request.url.params)))
        return httpx.Response(
            200, json={"task": "t", "version": 1, "bundle_id": "b", "purged_blobs": 0, "generation": 2, **OK}
        )

    client_on(monkeypatch, handler)
    with ClipbankClient("http://srv") as c:
        calls = {
            "activate": lambda v: c.push(PNG, activate=v),
            "force": lambda v: c.push(PNG, force=v),
            "wait_all": lambda v: c.push(PNG, wait_all=v),
            "purge": lambda v: c.delete("t", purge=v),
            "skip_bad": lambda v: c.classify([PNG], skip_bad=v),
            "match_labels": lambda v: c.classify([PNG], match_labels=v),
        }
        for name, call in calls.items():
            for bad in ("false", "yes", 1, 0, None):
                with pytest.raises(TypeError, match=f"{name} is True or False, got"):
                    call(bad)
        for bad in ("no", 1):
            with pytest.raises(TypeError, match="force is True or False"):
                c.activate("t", 1, force=bad)
            with pytest.raises(TypeError, match="wait_all is True or False"):
                c.set_shadow("t", 1, wait_all=bad)
        assert sent == []  # none of those was sent
        c.push(PNG, activate=np.bool_(False), force=False)
        c.delete("t", purge=np.bool_(True), wait_all=True)
    assert sent == [
        ("/tasks", {"mode": "inactive", "activate": "false", "force": "false"}),
        ("/tasks/t", {"purge": "true", "wait": "all"}),
    ]

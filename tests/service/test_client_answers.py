"""The client and the commands against answers and values an integrating user meets (an outside check's findings):
a 200 that is not clipbank's, timeouts while sending, numpy integers, URLs that cannot be, a lone label with a
comma, a folder of images, and a deactivation that changed nothing or left a shadow scoring."""

from __future__ import annotations

import io
import json
import re
import time
from copy import deepcopy

import httpx
import numpy as np
import pytest

from clipbank.cli import main
from service.client import ClipbankClient, ClipbankHTTPError
from tests.helpers import client_on

PNG = b"\x89PNG\r\n\x1a\n" + b"x" * 40
ROUTE = {"task": None, "version": None, "bundle_id": None, "score": None, "threshold": None}
URL = ["--url", "http://srv", "--token", "t" * 20]


def test_a_200_that_is_not_a_clipbank_answer_is_never_taken_for_success(monkeypatch, tmp_path, capsys):
    """`clipbank push` exited 0 and printed {"ok": true} against a server that stored nothing; the other commands
    printed a KeyError traceback."""
    client_on(monkeypatch, lambda request: httpx.Response(200, json={"ok": True}))
    calls = {
        "push": lambda c: c.push(PNG),
        "activate": lambda c: c.activate("t", 1),
        "shadow": lambda c: c.shadow("t"),
        "set_shadow": lambda c: c.set_shadow("t", 2),
        "stop_shadow": lambda c: c.set_shadow("t", None),
        "unclaimed": lambda c: c.unclaimed(),
        "delete": lambda c: c.delete("t"),
        "task": lambda c: c.task("t"),
        "classify": lambda c: c.classify([PNG]),
    }
    with ClipbankClient("http://srv") as c:
        for name, call in calls.items():
            with pytest.raises(ClipbankHTTPError, match="is it a clipbank server") as e:
                call(c)
            assert e.value.code == "not_clipbank", name
    bundle = tmp_path / "b.safetensors"
    bundle.write_bytes(b"x" * 100)
    for argv in (
        ["push", str(bundle)],
        ["shadow", "t"],
        ["shadow", "t", "--stop"],
        ["insights"],
        ["tasks", "activate", "t", "1"],
        ["tasks", "deactivate", "t"],
    ):
        assert main([*argv, *URL]) == 2, argv
        err = capsys.readouterr().err
        assert "is it a clipbank server?" in err and "Traceback" not in err, (argv, err)


def test_timeouts_while_sending_and_while_a_head_trickles_are_named_as_timeouts(monkeypatch):
    def stops_reading(request: httpx.Request) -> httpx.Response:
        raise httpx.WriteTimeout("timed out")

    client_on(monkeypatch, stops_reading)
    with ClipbankClient("http://srv", timeout=2) as c, pytest.raises(ClipbankHTTPError) as e:
        c.push(PNG)
    assert e.value.code == "timeout" and "stopped reading POST /tasks for 2 s" in e.value.message  # connection_failed

    def trickles(request: httpx.Request) -> httpx.Response:  # each read in time, the whole far later
        time.sleep(0.3)
        raise httpx.ReadTimeout("timed out")

    client_on(monkeypatch, trickles)
    with ClipbankClient("http://srv", timeout=0.1) as c, pytest.raises(ClipbankHTTPError) as e:
        c.health()
    assert e.value.code == "timeout" and "gave up after 0.3 s" in e.value.message, e.value.message

    def answers_slowly(request: httpx.Request) -> httpx.Response:  # the head in time, the body far later
        def body():
            yield b'{"status": '
            time.sleep(0.3)
            yield b'"ok"}'

        return httpx.Response(200, content=body())

    client_on(monkeypatch, answers_slowly)
    with ClipbankClient("http://srv", timeout=0.1) as c, pytest.raises(ClipbankHTTPError) as e:
        c.health()
    assert re.search(r"within the client's timeout \(gave up after 0\.[3-9] s\)", e.value.message), e.value.message


def test_numpy_integers_are_the_integers_they_are_and_other_values_are_named(monkeypatch):
    sent: list = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if request.url.path == "/classify":
            return httpx.Response(200, json={"results": [{"labels": [], "route": ROUTE}]})
        return httpx.Response(200, json={"task": "t", "active_version": 1, "shadow_version": 2, "generation": 3})

    client_on(monkeypatch, handler)
    with ClipbankClient("http://srv") as c:
        c.activate("t", np.int64(1))
        assert json.loads(sent[-1].content) == {"version": 1}
        c.set_shadow("t", np.int32(2))
        assert json.loads(sent[-1].content) == {"version": 2}
        c.classify([PNG], ["cat", "dog"], top_k=np.int64(1), min_generation=np.uint8(3))
        assert sent[-1].headers["X-Min-Generation"] == "3" and b'name="top_k"\r\n\r\n1\r\n' in sent[-1].content
        count = len(sent)
        for bad, words in (
            (lambda: c.classify([PNG], [None, "red"]), "label 0 is NoneType None; each label is a string"),
            (lambda: c.classify([PNG], [["a"], "b"]), "label 0 is list"),
            (lambda: c.classify([PNG], ["a", "b"], top_k=True), "top_k is an integer, got True"),
            (lambda: c.classify([PNG], ["a", "b"], top_k=1.5), "top_k is an integer, got float 1.5"),
            (lambda: c.activate("t", 1.0), "version is an integer, got float 1.0"),
        ):
            with pytest.raises(TypeError, match=words):
                bad()
    assert len(sent) == count  # refused before anything was sent (None went out as an empty label)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.1:18101x", "is not a valid URL"),  # was httpx.InvalidURL, past `except ValueError`
        ("http://127.0.0.1:99999", "has port 99999, outside 1..65535"),  # was 'connection refused' at the first call
        ("http://127.0.0.1:8000?x=1", "has a query or fragment"),  # every call then went to `/`
        ("http://srv/#top", "has a query or fragment"),
    ],
)
def test_a_server_url_that_cannot_be_is_refused_when_the_client_is_made(url, words):
    with pytest.raises(ValueError, match=words):
        ClipbankClient(url)


def test_a_bundle_file_is_streamed_whole_and_closed_and_a_pipe_is_read(monkeypatch, tmp_path):
    """A 300 MB push held about three copies of the file in memory; it is now read from the file as it is sent.
    A pipe (`clipbank push <(curl ...)`) has no size to declare: it is read first (the review's: h11 refused it)."""
    import io
    import os
    import pathlib
    import threading

    got: list = []
    opened: list = []

    def handler(request: httpx.Request) -> httpx.Response:
        got.append(request.read())
        assert int(request.headers["content-length"]) == len(got[-1])  # a pipe's fstat size is 0: h11 refused it
        return httpx.Response(201, json={"task": "t", "version": 1, "bundle_id": "b" * 64})

    client_on(monkeypatch, handler)
    real_open = pathlib.Path.open

    def tracked(self, *a, **k):
        f = real_open(self, *a, **k)
        opened.append(f)
        return f

    data = bytes(range(256)) * 4000
    (tmp_path / "v1.safetensors").write_bytes(data)
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: pytest.fail("read whole into memory"))
    monkeypatch.setattr(pathlib.Path, "open", tracked)
    with ClipbankClient("http://srv") as c:
        assert c.push(tmp_path / "v1.safetensors")["version"] == 1
        assert len(opened) == 1 and isinstance(opened[0], io.BufferedReader) and opened[0].closed
        with pytest.raises(IsADirectoryError, match="is a folder, not a bundle file"):
            c.push(tmp_path)
        monkeypatch.undo()
        client_on(monkeypatch, handler)
        r, w = os.pipe()
        writer = threading.Thread(target=lambda: (os.write(w, data[:50_000]), os.close(w)))
        writer.start()
        assert c.push(f"/dev/fd/{r}")["version"] == 1
        writer.join()
        os.close(r)
    assert data in got[0] and b'filename="v1.safetensors"' in got[0]
    assert data[:50_000] in got[1]


def test_retries_wait_what_the_server_said_and_a_little_more_at_random(monkeypatch):
    calls: list = []
    waits: list = []
    error = {"error": {"code": "overloaded", "message": "full", "details": None}}

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) <= 2:
            return httpx.Response(503, json=error, headers={"Retry-After": "2"})
        return httpx.Response(200, json={"results": []})

    client_on(monkeypatch, handler)
    monkeypatch.setattr(time, "sleep", waits.append)
    with ClipbankClient("http://srv", retries=2) as c:
        c.classify([PNG])
    # doubled after each try (an outside check: six CLI jobs on a full queue gave up after 3 waits of 1 s)
    assert len(waits) == 2 and 2.0 <= waits[0] <= 2.5 and 4.0 <= waits[1] <= 5.0, waits


def test_classify_takes_folders_and_a_lone_label_with_a_comma_is_named_before_sending(monkeypatch, tmp_path, capsys):
    sent: list = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.read())
        n = request.read().count(b'name="images"')
        return httpx.Response(200, json={"results": [{"labels": [{"label": "x", "score": 1.0}], "route": ROUTE}] * n})

    client_on(monkeypatch, handler)
    folder = tmp_path / "imgs"
    (folder / "b").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    for name in ("a.png", "b/c.JPG", ".hidden/d.png", "notes.txt"):
        (folder / name).write_bytes(PNG)
    assert main(["classify", str(folder), "--labels", "x,y", *URL]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(folder / "a.png"), str(folder / "b" / "c.JPG")]
    (tmp_path / "empty").mkdir()
    assert main(["classify", str(tmp_path / "empty"), *URL]) == 2
    assert "holds no image files" in capsys.readouterr().err
    assert main(["classify", "http://127.0.0.1:1/x.png", *URL]) == 2  # it said "No such file: 'http:/127...'"
    assert "is a URL" in capsys.readouterr().err
    assert main(["classify", str(folder / "a.png"), "--label", "a red, round thing", *URL]) == 2
    assert "give at least two" in capsys.readouterr().err
    assert len(sent) == 1


def test_a_deactivation_says_when_it_changed_nothing_and_when_a_shadow_still_scores(monkeypatch, capsys):
    answer = {"task": "cars", "was_active": False, "shadow_version": 3, "purged_blobs": 0, "kept": {}, "generation": 4}
    client_on(monkeypatch, lambda request: httpx.Response(200, json=answer))
    assert main(["tasks", "deactivate", "cars", *URL]) == 0
    captured = capsys.readouterr()
    assert captured.out == "task cars: it had no active version; nothing changed\n"
    assert "version 3 is still in shadow, scoring live traffic: `clipbank shadow cars --stop`" in captured.err


def test_a_library_users_findings_request_ids_long_waits_broken_changes_and_values(monkeypatch, tmp_path):
    """An outside check as a library user: no request id on errors, a Retry-After of an hour waited 30 s then
    retried, a connection broken mid-change without "may have landed", a task name no task can have sent, the
    string "false" taken as true, a lone surrogate raised by httpx, open files named `item0`, a 0x0 image."""
    from PIL import Image

    sent: list = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if request.url.path == "/tasks":
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        if request.url.params.get("x") == "late":
            return httpx.Response(
                503, json={"error": {"code": "overloaded", "message": "m"}}, headers={"Retry-After": "3600"}
            )
        error = {"error": {"code": "internal_error", "message": "the server log has the details"}}
        return httpx.Response(500, json=error, headers={"X-Request-ID": "abc123"})

    client_on(monkeypatch, handler)
    waits: list = []
    monkeypatch.setattr(time, "sleep", waits.append)
    with ClipbankClient("http://srv", retries=2) as c:
        with pytest.raises(ClipbankHTTPError) as e:
            c.classify([PNG])
        assert e.value.request_id == "abc123" and "(request id abc123)" in str(e.value)
        assert deepcopy(e.value).request_id == "abc123"  # __reduce__, as a process pool's pickle uses it
        with pytest.raises(ClipbankHTTPError) as e:
            c._call("GET", "/tasks/t", params={"x": "late"})
        assert e.value.retry_after == 3600 and waits == []  # raised at once, not after 30 s and a retry
        with pytest.raises(ClipbankHTTPError, match="broke off POST /tasks.*may still land") as e:
            c.push(PNG)
        assert e.value.code == "connection_failed"
        n = len(sent)
        for bad in ("../x", ""):
            with pytest.raises(ValueError, match="no task can have that name"):
                c.classify([PNG], task=bad)
        with pytest.raises(TypeError, match="match_labels is True or False"):
            c.classify([PNG], match_labels="false")
        with pytest.raises(ValueError, match=r"label 1 .* not valid Unicode"):
            c.classify([PNG], labels=["ok", "\ud800"])
        with pytest.raises(ValueError, match="0x0 pixels"):
            c.classify([Image.new("RGB", (0, 0))])
        assert len(sent) == n  # none of those was sent
        (tmp_path / "cat.png").write_bytes(PNG)
        with open(tmp_path / "cat.png", "rb") as f, pytest.raises(ClipbankHTTPError):
            c.classify([f])
        assert b'filename="cat.png"' in sent[-1].content


def test_threads_sharing_one_lazily_loaded_image_or_one_open_file_all_send_its_bytes(monkeypatch, tmp_path):
    """An outside check: 4 threads classifying one `Image.open(...)` not yet loaded got wrong answers and errors
    ("image file is truncated"), and the image stayed damaged; a shared open file sent other bytes now and then."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from service.client_inputs import _bytes

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    want = _bytes(Image.open(tmp_path / "p.png"))
    for _ in range(5):
        shared = Image.open(tmp_path / "p.png")  # lazy: its pixels are read at the first use
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(_bytes, [shared] * 8))
        assert all(g == want for g in got) and _bytes(shared) == want
    raw = (tmp_path / "p.png").read_bytes()
    with open(tmp_path / "p.png", "rb") as f, ThreadPoolExecutor(4) as pool:
        assert all(g == raw for g in pool.map(_bytes, [f] * 200))


def test_push_and_shadow_say_a_failing_gate_report_beside_the_answer(monkeypatch, tmp_path, capsys):
    """An outside check: a version put in shadow whose gate report failed printed only "version in shadow 1", and
    `push --shadow` buried it in the JSON; its promotion was then refused."""
    gate = {"passed": False, "offences": ["it would take 5.8% of the images of task 'glyphs' (limit 2.0%)"]}
    answers = {
        "/tasks": {"task": "arrows", "version": 1, "bundle_id": "b" * 64, "generation": 2, "gate": gate},
        "/tasks/arrows/shadow": {"task": "arrows", "shadow_version": 1, "active_version": None, "gate": gate},
    }
    client_on(monkeypatch, lambda request: httpx.Response(200, json=answers[request.url.path]))
    bundle = tmp_path / "b.safetensors"
    bundle.write_bytes(b"x" * 100)
    for argv in (["push", str(bundle), "--shadow"], ["shadow", "arrows", "--version", "1"]):
        assert main([*argv, *URL]) == 0
        err = capsys.readouterr().err
        assert "task arrows v1 fails the interference gate" in err and "5.8% of the images of task 'glyphs'" in err
    answers["/tasks"]["gate"] = {"passed": True, "offences": []}
    assert main(["push", str(bundle), "--shadow", *URL]) == 0 and capsys.readouterr().err == ""


def test_the_client_locks_each_shared_object_on_its_own():
    """A review: one lock for every file and image made a slow pipe hold up every other thread's call."""
    import gc
    import io

    from PIL import Image

    from service.client_inputs import _SHARED

    a, b, f = Image.new("RGB", (2, 2)), Image.new("RGB", (2, 2)), io.BytesIO(b"x")
    assert _SHARED(a) is _SHARED(a) and len({id(_SHARED(x)) for x in (a, b, f)}) == 3
    with _SHARED(a):  # held: another object's lock is free
        assert _SHARED(b).acquire(timeout=0.1)
        _SHARED(b).release()
    n = len(_SHARED._locks)
    del a
    gc.collect()
    assert len(_SHARED._locks) == n - 1  # dropped with its object


def test_push_says_what_the_version_it_replaces_had_and_what_its_training_warned(
    monkeypatch, tmp_path, capsys, backbone
):
    """An outside check: `train --version 2` on 2 new classes, then `push`, replaced a v1 of 6 classes; its
    selector then claimed 96% of their images and answered them wrong. The gate (other tasks) passed it, and push
    said nothing, nor what the training had warned."""
    from model_store.bank import empty_bank
    from tests.helpers import edit_bundle, random_bundle

    def warned(m):
        m["training"] = {"val_warnings": ["validation accuracy 57.5% is low"], "routing": {"warnings": ["claims 80%"]}}

    bundle = tmp_path / "v2.safetensors"
    bundle.write_bytes(edit_bundle(random_bundle(empty_bank(backbone), "greek", seed=1, version=2), warned))
    old = {"version": 1, "classes": ["alpha", "beta", "gamma"], "metrics": {"val_accuracy": 0.867}}
    new = {"version": 2, "classes": ["alpha", "lambda"], "metrics": {"val_accuracy": 0.575}}
    seen: list = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, request.headers.get("x-min-generation")))
        if request.method == "POST":
            return httpx.Response(201, json={"task": "greek", "version": 2, "bundle_id": "b" * 64, "generation": 5})
        versions = [old] if len(seen) == 1 else [old, new]
        return httpx.Response(200, json={"task": "greek", "active_version": len(versions), "versions": versions})

    client_on(monkeypatch, handler)
    assert main(["push", str(bundle), *URL]) == 0
    err = capsys.readouterr().err
    assert "task greek v2 replaces v1 and lacks 2 of its 3 classes (beta, gamma)" in err, err
    assert "`clipbank tasks activate greek 1`" in err and "validation accuracy 57.5% against v1's 86.7%" in err
    assert "its training warned: validation accuracy 57.5% is low" in err and "its training warned: claims 80%" in err
    assert seen == [("GET", "/tasks/greek", None), ("POST", "/tasks", None), ("GET", "/tasks/greek", "5")]
    # an outside check's rollback: v1's figure was measured on 1 of its 3 classes, which the message did not say
    old["metrics"]["val_classes"], seen[:] = 1, []
    assert main(["push", str(bundle), *URL]) == 0
    assert "validation accuracy 57.5% against v1's 86.7% (1/3 classes)" in capsys.readouterr().err

    # a server that compares itself (its answer's `warnings`): said as it says them, with no second reading
    said = "task greek v2 replaces v1 and lacks 2 of its 3 classes (as the server says)"
    real = handler

    def comparing(request: httpx.Request) -> httpx.Response:
        answer = real(request)
        if request.method == "POST":
            return httpx.Response(201, json={**answer.json(), "warnings": [said]})
        return answer

    client_on(monkeypatch, comparing)
    seen[:] = []
    assert main(["push", str(bundle), *URL]) == 0
    err = capsys.readouterr().err
    assert said in err and "86.7%" not in err and seen == [("GET", "/tasks/greek", None), ("POST", "/tasks", None)]


def test_a_client_command_that_gets_no_answer_says_so_once_in_the_time_it_was_given(
    monkeypatch, tmp_path, capsys, backbone
):
    """An outside check: `push` to a server that never answered waited 60 s on the comparison's GET, then 60 s on
    the upload, and said "within 60 s"; no client command could wait less (`--timeout`, `$CLIPBANK_TIMEOUT`)."""
    seen: list = []

    def silent(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, request.extensions["timeout"]["read"]))
        raise httpx.ReadTimeout("timed out", request=request)

    client_on(monkeypatch, silent)
    bundle = tmp_path / "b.safetensors"
    from model_store.bank import empty_bank
    from tests.helpers import random_bundle

    bundle.write_bytes(random_bundle(empty_bank(backbone), "greek", seed=1))
    assert main(["push", str(bundle), *URL, "--timeout", "2.5"]) == 3
    assert seen == [("GET", "/tasks/greek", 2.5)]  # the upload is not sent after the read went unanswered
    assert "did not answer GET /tasks/greek within 2.5 s" in capsys.readouterr().err
    seen.clear()
    monkeypatch.setenv("CLIPBANK_TIMEOUT", "4")
    assert main(["tasks", "activate", "greek", "2", *URL]) == 3 and seen[0][2] == 4.0
    assert main(["tasks", *URL, "--timeout", "1"]) == 3 and seen[-1][2] == 1.0  # the flag wins
    assert main(["tasks", "activate", "greek", "2", *URL, "--timeout", "1.5"]) == 3 and seen[-1][2] == 1.5
    for bad in ("abc", "0", "inf"):
        monkeypatch.setenv("CLIPBANK_TIMEOUT", bad)
        assert main(["classify", "x.png", "--label", "a", "--label", "b", *URL]) == 2
        assert f"CLIPBANK_TIMEOUT: a number of seconds > 0 is needed, got '{bad}'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["push", str(bundle), *URL, "--timeout", "-1"])
    assert usage.value.code == 2 and "--timeout: a number of seconds > 0 is needed, got '-1'" in capsys.readouterr().err


def test_a_client_that_waits_for_a_starting_server_says_so(monkeypatch, tmp_path, caplog):
    """An outside check: `clipbank classify` sent to a server still loading waited 41 s, saying nothing."""
    import logging

    from PIL import Image

    route = {"task": None, "version": None, "bundle_id": None, "score": None, "threshold": None}
    result = {"labels": [{"label": "a", "score": 0.9}, {"label": "b", "score": 0.1}], "route": route}
    not_ready = {"error": {"code": "not_ready", "message": "loading", "details": None}}
    answers = [
        httpx.Response(503, json=not_ready, headers={"Retry-After": "0"}),
        httpx.Response(200, json={"results": [result], "timing": {}}),
    ]
    client_on(monkeypatch, lambda request: answers.pop(0))
    Image.new("RGB", (4, 4), "red").save(tmp_path / "red.png")
    with caplog.at_level(logging.INFO, logger="clipbank.client"):
        code = main(["classify", str(tmp_path / "red.png"), "--label", "a", "--label", "b", "--url", "http://srv"])
    assert code == 0 and answers == []
    assert "POST /classify: 503 not_ready; sending it again in 0.0 s (try 2 of 4)" in caplog.text, caplog.text


def test_push_exists_ok_is_exit_0_for_this_very_bundle_stored_in_the_state_asked(
    monkeypatch, tmp_path, capsys, backbone
):
    """An outside check: a CI job's push retried after a timeout whose upload had landed got exit 1 (409)."""
    from model_store.bank import empty_bank
    from tests.helpers import random_bundle

    bundle = tmp_path / "b.safetensors"
    bundle.write_bytes(random_bundle(empty_bank(backbone), "greek", seed=1))
    details = {"task": "greek", "version": 1, "same_bytes": True, "state": "active", "newest": 1}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(404, json={"error": {"code": "task_not_found", "message": "no", "details": None}})
        error = {"code": "version_conflict", "message": "version 1 of greek is stored", "details": details}
        return httpx.Response(409, json={"error": error})

    client_on(monkeypatch, handler)
    assert main(["push", str(bundle), *URL]) == 1  # as before, without the flag
    capsys.readouterr()
    assert main(["push", str(bundle), *URL, "--exists-ok"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["same_bytes"] is True and "stored already, active: nothing changed" in out.err
    assert main(["push", str(bundle), *URL, "--exists-ok", "--shadow"]) == 1  # stored, but not as asked
    assert "stored already, active, not shadow" in capsys.readouterr().err
    details["same_bytes"] = False  # another bundle at that version: a conflict still
    assert main(["push", str(bundle), *URL, "--exists-ok"]) == 1


def test_push_of_a_pipe_sends_every_byte_of_it(monkeypatch, backbone):
    """The review of the push's comparison: reading the manifest ahead from `<(cat bundle)` took its first 4 KiB,
    and the server got a truncated bundle. A file that is not a regular one is read once, by the upload."""
    import os
    import threading

    from model_store.bank import empty_bank
    from tests.helpers import random_bundle

    data = random_bundle(empty_bank(backbone), "greek", seed=1)
    got: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            got.append(request.read())
            return httpx.Response(201, json={"task": "greek", "version": 1, "bundle_id": "b" * 64, "generation": 1})
        return httpx.Response(404, json={"error": {"code": "task_not_found", "message": "no", "details": None}})

    client_on(monkeypatch, handler)
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    writer.start()
    try:
        assert main(["push", f"/dev/fd/{r}", *URL]) == 0
    finally:
        writer.join()
        os.close(r)
    assert data in got[0]


def test_numpy_arrays_of_pixels_are_images_and_a_huge_pil_image_is_shrunk_to_fit(monkeypatch):
    """An outside check: numpy arrays (the most common image in ML code) were refused; a 24 MP PIL image of noise
    was sent as a JPEG of over 16 MiB, which the server refused (the model sees a few hundred pixels)."""
    from PIL import Image

    from service.config import Limits

    sent: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.read())
        return httpx.Response(200, json={"results": [{"labels": [], "route": {}}] * 2, "timing": {}})

    client_on(monkeypatch, handler)
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :, 0] = 255
    with ClipbankClient("http://srv") as c:
        c.classify([rgb, np.zeros((2, 8, 8, 1), np.uint8)[0]])  # an RGB image, a grey one with its channel
        png = sent[0][sent[0].index(b"\x89PNG") :]
        first = Image.open(io.BytesIO(png))
        assert first.size == (30, 20) and first.convert("RGB").getpixel((0, 0)) == (255, 0, 0)
        c.classify(np.zeros((2, 16, 16, 3), np.uint8))  # a batch array: one image per row
        with pytest.raises(TypeError, match="are lists"):
            c.classify(rgb)  # one image, not a list of its rows
        with pytest.raises(TypeError, match=r"uint8 pixels.*float32.*\(x \* 255\)"):
            c.classify([rgb.astype(np.float32) / 255])
        with pytest.raises(TypeError, match=r"uint16.*\(x // 257\)"):  # x * 255 overflowed it (an outside check)
            c.classify([rgb.astype(np.uint16) * 257])
        with pytest.raises(ValueError, match=r"an image array of shape \(0, 0, 3\)"):  # was "a PIL image of 0x0"
            c.classify([np.zeros((0, 0, 3), np.uint8)])
        noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (4900, 4800, 3), dtype=np.uint8))
        sent.clear()
        c.classify([noise])
    assert len(sent[0]) <= Limits.max_image_bytes + 4096, len(sent[0])

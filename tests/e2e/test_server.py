"""A real server on 127.0.0.1: zero-shot, push, route, pin, roll back, delete, restart; then load during changes."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from benchmarks.samples import domain_pngs
from clipbank.cli import main
from service.client import ClipbankClient, ClipbankHTTPError
from tests.e2e.conftest import ONNX_CACHE, TOKEN, running_server
from tests.helpers import over_broad, with_version
from tests.service.images import colour


def test_lifecycle_and_restart(tmp_path, bundles, capsys):
    store, log = tmp_path / "store", tmp_path / "server.log"
    textures_imgs = domain_pngs("textures", 12)
    with running_server(store, log) as url, ClipbankClient(url, TOKEN) as client:
        assert client.ready()["frozen_runtime"] == "onnx"  # the default on CPU
        # 1. zero-shot
        out = client.classify([colour("red"), colour("blue")], ["red", "green", "blue"])
        assert [r["labels"][0]["label"] for r in out["results"]] == ["red", "blue"]
        assert all(r["route"]["task"] is None for r in out["results"])

        # 2. an over-broad version of a bundle trained in this session: the gate refuses it, naming what it would
        # capture; the bundle itself passes and its domain routes to it
        with pytest.raises(ClipbankHTTPError) as refused:
            client.push(over_broad(bundles["textures"]))
        assert refused.value.status == 409 and refused.value.details["zero_shot_captured"] > 0.9
        up = client.push(bundles["textures"])
        assert (up["task"], up["version"], up["gate"]["passed"]) == ("textures", 1, True)
        routes = [r["route"] for r in client.classify(textures_imgs)["results"]]
        assert sum(r["task"] == "textures" for r in routes) >= 8, routes

        # 3. pin: an image of another domain, forced to the task
        out = client.classify([colour("red")], task="textures")
        assert out["results"][0]["route"]["task"] == "textures"

        # 4. a second version, then roll back to the first
        v2 = tmp_path / "textures-v2.safetensors"
        v2.write_bytes(with_version(bundles["textures"], 2))
        assert main(["push", str(v2), "--url", url, "--token", TOKEN, "--force"]) == 0  # the command line
        assert json.loads(capsys.readouterr().out)["version"] == 2
        red = tmp_path / "red.png"
        red.write_bytes(colour("red"))
        assert main(["classify", str(red), "--labels", "red,blue", "--task", "zero-shot", "--url", url]) == 0
        assert capsys.readouterr().out.split("\t")[1] == "red"
        assert main(["push", str(v2), "--url", url, "--token", "wrong-token-wrong-token"]) == 1  # refused: 401
        assert "401 unauthorized" in capsys.readouterr().err
        assert client.activate("textures", 1, force=True)["active_version"] == 1
        versions = {r["route"]["version"] for r in client.classify(textures_imgs)["results"] if r["route"]["task"]}
        assert versions == {1}

        # 5. delete: no more routing to it
        client.delete("textures")
        out = client.classify(textures_imgs[:4], ["a", "b"])
        assert all(r["route"]["task"] is None for r in out["results"])
        try:
            client.classify(textures_imgs[:1], task="textures")
            raise AssertionError("a deleted task must not be pinnable")
        except ClipbankHTTPError as e:
            assert e.status == 404 and e.code == "task_not_found"

        assert main(["classify", str(red), "--url", url]) == 0  # no labels, and no task claims it
        assert "no task claims it" in capsys.readouterr().out

        client.activate("textures", 2, force=True)
        client.push(bundles["glyphs"])
        g2 = tmp_path / "glyphs-v2.safetensors"
        g2.write_bytes(with_version(bundles["glyphs"], 2))
        assert main(["push", str(g2), "--shadow", "--url", url, "--token", TOKEN]) == 0
        assert json.loads(capsys.readouterr().out)["version"] == 2
        tasks_before = client.tasks()
        answer_before = client.classify(textures_imgs)
    # 6. restart on the same store: the same bank, the same answers
    with running_server(store, log) as url, ClipbankClient(url, TOKEN) as client:
        assert client.tasks() == tasks_before
        answer_after = client.classify(textures_imgs)
        # 7. the version in shadow survived the restart and scores auto traffic; the unclaimed monitor answers
        assert client.task("glyphs")["shadow_version"] == 2
        client.classify(domain_pngs("glyphs", 8))
        assert main(["shadow", "glyphs", "--url", url, "--token", TOKEN]) == 0
        assert "of 20 auto-routed images" in capsys.readouterr().out
        png = tmp_path / "unclaimed.png"
        assert main(["insights", "--png", str(png), "--url", url, "--token", TOKEN]) == 0
        assert "auto-routed images went to zero-shot" in capsys.readouterr().out and png.stat().st_size > 5000
    for a, b in zip(answer_before["results"], answer_after["results"], strict=True):
        assert a["route"] == b["route"]
        assert [x["label"] for x in a["labels"]] == [x["label"] for x in b["labels"]]
        assert (
            max((abs(x["score"] - y["score"]) for x, y in zip(a["labels"], b["labels"], strict=True)), default=0) < 1e-4
        )
    assert "Traceback" not in log.read_text()


def test_eval_scores_a_labelled_folder_as_served_and_shows_what_a_change_cost(tmp_path, bundles, capsys):
    """`clipbank eval`: a task's test folder scored through the server (the same answers a client gets), then,
    against that report as --baseline, what deleting the task cost its classes."""
    from training.export import export_domain

    export_domain("textures", tmp_path / "tex", splits=("test",))
    folder = tmp_path / "tex" / "test"
    files = sorted(p for p in folder.rglob("*.png"))
    classes = sorted(p.name for p in folder.iterdir())
    with running_server(tmp_path / "store", tmp_path / "server.log") as url, ClipbankClient(url, TOKEN) as client:
        client.push(bundles["textures"], force=True)
        args = ["eval", str(folder), "--url", url, "--quiet"]
        assert main([*args, "--json"]) == 0
        before = json.loads(capsys.readouterr().out)
        answers = []  # the same images, sent by the client library with the folder's classes as labels
        for a in range(0, len(files), 64):
            answers += client.classify(files[a : a + 64], classes, top_k=1)["results"]
        right = sum(r["labels"][0]["label"] == f.parent.name for r, f in zip(answers, files, strict=True))
        assert before["images"] == len(files) and before["accuracy"] == round(right / len(files), 4)
        routed = sum(r["route"]["task"] == "textures" for r in answers) / len(files)
        assert before["routes"]["textures"] == round(routed, 4) and routed > 0.8, before["routes"]
        assert sum(c["images"] for c in before["classes"].values()) == len(files) and not before["refused"]
        assert before["versions"] == {"textures": [1]}  # which version answered: what a baseline was taken on
        (tmp_path / "before.json").write_text(json.dumps(before))

        client.delete("textures")
        assert main([*args, "--baseline", str(tmp_path / "before.json")]) == 0
        out = capsys.readouterr().out
    *_, last, versions = out.strip().splitlines()  # "accuracy xx.x% (-yy.y pts) over N images (...); routed: ..."
    assert versions == "answered by zero-shot only (baseline: textures v1)", out
    after = float(last.split()[1].rstrip("%")) / 100
    change = float(last.split()[2].strip("("))
    assert abs(change - (after - before["accuracy"]) * 100) < 0.15 and "zero-shot 100%" in last, out
    assert all(line.split()[0] in classes for line in out.strip().splitlines()[1 : 1 + len(classes)]), out


class Timeline:
    """Which bundle each management change left active, with when the change started and ended."""

    def __init__(self) -> None:
        self.ops: list[tuple[float, float, str | None]] = []

    def record(self, start: float, active: str | None) -> None:
        self.ops.append((start, time.monotonic(), active))

    def possible(self, a: float, b: float) -> set[str | None]:
        """Bundles that may have been active at some instant of [a, b]."""
        out = set()
        states = [(float("-inf"), None)] + [(s, act) for s, _, act in self.ops]
        ends = [e for _, e, _ in self.ops] + [float("inf")]
        for (start, active), end in zip(states, ends, strict=True):
            if start <= b and end >= a:  # state k may hold from op k's start until op k+1's end
                out.add(active)
        return out


def _load(url: str, images: list[bytes], stop: threading.Event, seen: list, errors: list) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        i = 0
        while not stop.is_set():
            files = [("images", (f"{k}.png", images[(i + k) % len(images)])) for k in range(3)]
            a = time.monotonic()
            try:
                r = http.post("/classify", files=files, data={"labels": ["stripes", "dots"]})  # textures knows them
            except httpx.HTTPError as e:
                errors.append(repr(e))
                continue
            b = time.monotonic()
            if r.status_code != 200:
                errors.append(f"{r.status_code} {r.text[:200]}")
            else:
                seen.append((a, b, [res["route"] for res in r.json()["results"]]))
            i += 1


def test_sixteen_clients_while_bundles_are_pushed_deleted_and_rolled_back(tmp_path, bundles):
    textures = bundles["textures"]
    images = domain_pngs("textures", 8) + domain_pngs("shapes", 8)
    timeline, seen, errors, stop = Timeline(), [], [], threading.Event()
    with running_server(tmp_path / "store", tmp_path / "server.log", "--max-wait-ms", "2") as url:
        clients = [threading.Thread(target=_load, args=(url, images, stop, seen, errors)) for _ in range(16)]
        for t in clients:
            t.start()
        try:
            with ClipbankClient(url, TOKEN) as admin:
                t0 = time.monotonic()
                first = admin.push(textures, force=True)["bundle_id"]  # the gate refuses textures on tiny
                timeline.record(t0, first)
                for version in range(2, 8):
                    t0 = time.monotonic()
                    bid = admin.push(with_version(textures, version), force=True)["bundle_id"]
                    timeline.record(t0, bid)
                    t0 = time.monotonic()
                    admin.activate("textures", 1, force=True)  # roll back
                    timeline.record(t0, first)
                    t0 = time.monotonic()
                    admin.delete("textures")
                    timeline.record(t0, None)
                    time.sleep(0.2)  # let requests land on every state
        finally:
            stop.set()
            for t in clients:
                t.join(60)
    assert not errors, errors[:5]
    assert len(seen) > 50
    routed = 0
    for a, b, routes in seen:
        possible = timeline.possible(a, b)
        for route in routes:
            if route["task"] is not None:
                routed += 1
                assert route["bundle_id"] in possible, (route, a, b)
    assert routed > 0
    assert "Traceback" not in (tmp_path / "server.log").read_text()


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
def test_sigterm_lets_in_flight_requests_finish(tmp_path, stop):
    """Requests waiting in the batch queue when SIGTERM arrives are still answered. SIGHUP (a closed terminal) is
    taken as SIGTERM: an outside check's server died at once on it, with 10 requests in flight."""
    import os
    import signal

    from benchmarks.process import server_process

    env = {"CLIPBANK_ADMIN_TOKEN": TOKEN, "OMP_NUM_THREADS": "1", "CLIPBANK_ONNX_CACHE": ONNX_CACHE}
    args = ("--max-wait-ms", "3000", "--max-batch", "64")  # the first request waits 3 s for company
    results: list = []
    with server_process(tmp_path / "store", args, env, tmp_path / "server.log", ready_seconds=120) as (url, pid):
        for _ in range(2):  # requests less than 3 s apart: from now on a batch waits for company
            files = [("images", ("r.png", colour("red")))]
            assert httpx.post(url + "/classify", files=files, data={"labels": ["red"]}, timeout=60).status_code == 200

        def post() -> None:
            files = [("images", ("r.png", colour("red")))]
            try:
                r = httpx.post(url + "/classify", files=files, data={"labels": ["red", "blue"]}, timeout=60)
                results.append(r.status_code)
            except httpx.HTTPError as e:
                results.append(repr(e))

        threads = [threading.Thread(target=post) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while "clipbank_queue_images 4.0" not in httpx.get(url + "/metrics").text:
            assert time.monotonic() < deadline, "the requests never reached the queue"
            time.sleep(0.05)
        os.kill(pid, getattr(signal, stop))
        for t in threads:
            t.join(60)
    assert results == [200] * 4


def test_a_second_ctrl_c_answers_what_it_cuts_short(tmp_path):
    """uvicorn quits at once on a second SIGINT ("CTRL+C to force quit"): an outside check's in-flight requests got
    a plain-text 500 each, and the log a traceback each. Now: 503 `not_ready` (JSON), no traceback, exit 130."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from benchmarks.process import _wait_ready, free_port

    env = {**os.environ, "CLIPBANK_ADMIN_TOKEN": TOKEN, "OMP_NUM_THREADS": "1", "CLIPBANK_ONNX_CACHE": ONNX_CACHE}
    port, log = free_port(), tmp_path / "server.log"
    cmd = [sys.executable, "-m", "clipbank.cli", "serve", "--store", str(tmp_path / "store"), "--port", str(port)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}", 120, log)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:  # an upload whose body stalls
            sock.sendall(
                b"POST /tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
                b"Content-Type: multipart/form-data; boundary=zz\r\nContent-Length: 100000\r\n\r\n--zz\r\n"
            )
            time.sleep(1)
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"x-clipbank-error: not_ready" in head.lower(), answer
    assert b"second Ctrl-C" in body
    text = log.read_text()
    # its last line: asyncio may end the run with the second SIGINT as KeyboardInterrupt (the command's own line)
    assert re.search(r"stopped at once \(a second Ctrl-C\)|clipbank serve: interrupted", text), text
    assert "Traceback" not in text, text


def test_outside_traffic_through_the_server_routes_as_measured_offline(tmp_path, bundles, trained, backbone):
    """Plain and near outside images (a task's look, another concept) through the real server, against the
    offline routing (`training.routing.routes`) that `clipbank bench routing` and training reports use: by the
    selectors alone (`match_labels=false`), and as served by default to clients sending each domain's labels."""
    import io

    import torch
    from PIL import Image

    from model_store.reference import embed_images
    from training.domains import get_domain
    from training.lookalike import NEAR_OUTSIDE
    from training.routing import routes

    _, _, banks = trained
    bank = banks["glyphs"]  # textures, then glyphs: what the server will hold
    domains = ["shapes", *NEAR_OUTSIDE, "glyphs"]
    pngs = {d: domain_pngs(d, 30) for d in domains}
    labels = {d: list(get_domain(d).classes) for d in domains}

    def tasks_of(answer: dict) -> list[str | None]:
        return [r["route"]["task"] for r in answer["results"]]

    with running_server(tmp_path / "store", tmp_path / "server.log") as url, ClipbankClient(url, TOKEN) as client:
        for task in ("textures", "glyphs"):
            client.push(bundles[task], force=task == "textures")  # the gate refuses textures on tiny
        alone = {d: tasks_of(client.classify(p, ["a", "b"], match_labels=False)) for d, p in pngs.items()}
        served = {d: tasks_of(client.classify(p, labels[d])) for d, p in pngs.items()}
    names = [t.name for t in bank.tasks]
    agree, fallback = {}, {}
    for d, p in pngs.items():
        feats = embed_images(backbone, [Image.open(io.BytesIO(b)) for b in p])
        known = torch.tensor([not set(labels[d]).isdisjoint(t.classes) for t in bank.tasks])
        for kind, answer, mask in (("alone", alone, None), ("served", served, known)):
            routed = routes([t.selector for t in bank.tasks], feats, mask).tolist()
            offline = [names[i] if i >= 0 else None for i in routed]
            agree[kind, d] = sum(a == b for a, b in zip(answer[d], offline, strict=True)) / len(p)
            fallback[kind, d] = answer[d].count(None) / len(p)
    assert min(agree.values()) >= 0.95, agree  # the server routes as measured (ONNX vs torch: ties may differ)
    assert fallback["alone", "shapes"] >= 0.97, fallback  # the plain outside domain goes to zero-shot CLIP
    assert alone["glyphs"].count("glyphs") >= 0.9 * len(pngs["glyphs"]), alone["glyphs"]
    # other letters, arrows on clutter, ink letters: no task knows their labels, so none may claim them
    assert all(fallback["served", d] == 1.0 for d in NEAR_OUTSIDE), fallback
    assert served["glyphs"].count("glyphs") >= alone["glyphs"].count("glyphs"), served["glyphs"]

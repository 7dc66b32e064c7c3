"""clipbank on Ray Serve: a local Ray cluster, 2 replicas of the unchanged app, one S3 store (moto on 127.0.0.1).

One cluster for the module (starting Ray takes seconds); skipped when the `[scale]` extra is not installed.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from model_store.bank import empty_bank
from tests.helpers import random_bundle
from tests.service.conftest import AUTH, TOKEN
from tests.service.images import colour

pytestmark = pytest.mark.slow
REPLICAS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


APP = "default"  # what `serve run` names the application (`clipbank serve --engine ray` names it clipbank)


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    import boto3

    from service.config import ServeConfig
    from service.ray_engine import application

    bucket = f"clipbank-ray-{time.monotonic_ns()}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "CLIPBANK_S3_ENDPOINT_URL": s3_server,
    }
    with pytest.MonkeyPatch.context() as m:
        for name, value in env.items():
            m.setenv(name, value)
        m.setenv("CLIPBANK_S3_CACHE_DIR", str(tmp_path_factory.mktemp("s3-cache")))
        boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
        port = free_port()
        config = ServeConfig(
            store=f"s3://{bucket}/bank",
            admin_token=TOKEN,
            host="127.0.0.1",
            port=port,
            frozen_runtime="torch",
            gate_max_zero_shot=1.0,  # random bundles claim outside images
            poll_seconds=1.0,
            replicas=REPLICAS,
        )
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            # named as `serve run` names it: the replicas find their peers under their own app's name
            serve.run(application(config), name=APP, route_prefix="/")
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                yield client
        finally:
            serve.shutdown()
            ray.shutdown()


def classify(client, min_generation: int | None = None) -> httpx.Response:
    headers = {"X-Min-Generation": str(min_generation)} if min_generation is not None else {}
    files = [("images", ("x.png", colour("red")))]
    return client.post("/classify", files=files, data={"labels": ["a", "b"]}, headers=headers)


def replicas_at(client, generation: int, deadline_s: float) -> dict[str, int]:
    """Poll until every replica has answered from `generation` or later (each answer names its replica)."""
    seen: dict[str, int] = {}
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        response = client.get("/readyz")
        seen[response.headers["X-Clipbank-Replica"]] = int(response.headers["X-Clipbank-Generation"])
        if len(seen) >= REPLICAS and min(seen.values()) >= generation:
            return seen
    raise AssertionError(f"within {deadline_s}s the replicas answered from {seen}, not all at {generation}")


def test_an_upload_reaches_every_replica_and_wait_all_says_so(cluster, backbone):
    data = random_bundle(empty_bank(backbone), "cars", seed=1)
    t0 = time.monotonic()
    pushed = cluster.post("/tasks", params={"wait": "all"}, files={"bundle": ("b", data)}, headers=AUTH)
    assert pushed.status_code == 201, pushed.text
    body = pushed.json()
    generation = body["generation"]
    assert len(body["replicas"]) == REPLICAS and set(body["replicas"].values()) == {generation}
    seen = replicas_at(cluster, generation, deadline_s=2.0)
    assert len(seen) == REPLICAS, seen
    assert time.monotonic() - t0 < 30
    scraped = cluster.get("/metrics")  # any one replica answers; its every sample names it
    replica = scraped.headers["X-Clipbank-Replica"]
    assert replica in seen
    assert f'clipbank_bank_generation{{replica="{replica}"}} {float(generation)}' in scraped.text


def test_min_generation_reads_your_writes_or_503(cluster):
    current = int(cluster.get("/readyz").headers["X-Clipbank-Generation"])
    ok = classify(cluster, current)
    assert ok.status_code == 200 and int(ok.headers["X-Clipbank-Generation"]) >= current
    ahead = classify(cluster, current + 1000)
    assert ahead.status_code == 503 and ahead.headers["Retry-After"] == "1"
    assert ahead.json()["error"]["code"] == "stale_replica"
    bad = classify(cluster, "soon")  # type: ignore[arg-type]
    assert bad.status_code == 400 and "X-Min-Generation" in bad.json()["error"]["message"]


def test_an_answer_carries_its_request_id_once(cluster):
    """Ray's proxy answers with the request's id, and the app added it again: clients read `a, a`."""
    given = cluster.get("/healthz", headers={"X-Request-ID": "job-7:step.2"})
    assert given.headers.get_list("X-Request-ID") == ["job-7:step.2"]
    (made,) = cluster.post("/classify", files={"images": ("x", b"not an image")}).headers.get_list("X-Request-ID")
    assert made.strip()


def test_two_uploads_through_the_proxy_at_once_both_land(cluster, backbone):
    bank = empty_bank(backbone)
    datas = {f"race{i}": random_bundle(bank, f"race{i}", seed=10 + i) for i in range(2)}
    answers: dict[str, httpx.Response] = {}

    def push(task: str) -> None:
        answers[task] = cluster.post("/tasks", files={"bundle": ("b", datas[task])}, headers=AUTH)

    threads = [threading.Thread(target=push, args=(t,)) for t in datas]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert {t: r.status_code for t, r in answers.items()} == {t: 201 for t in datas}, {
        t: r.text for t, r in answers.items()
    }
    newest = max(r.json()["generation"] for r in answers.values())
    replicas_at(cluster, newest, deadline_s=5.0)
    listed = cluster.get("/tasks", headers=AUTH).json()
    assert set(datas) <= {t["task"] for t in listed["tasks"]}


def replica_pids() -> dict[str, int]:
    from ray import serve

    from service.ray_engine import DEPLOYMENT

    answers = serve.get_deployment_handle(DEPLOYMENT, APP).broadcast("sync", 0).results(timeout_s=30)
    return {a["replica"]: a["pid"] for a in answers}


def test_a_replica_killed_during_a_swap_comes_back_at_the_current_generation(cluster, backbone):
    before = replica_pids()
    victim, pid = next(iter(before.items()))
    data = random_bundle(empty_bank(backbone), "killed", seed=5)
    pushing = threading.Thread(
        target=lambda: answers.append(cluster.post("/tasks", files={"bundle": ("b", data)}, headers=AUTH))
    )
    answers: list[httpx.Response] = []
    pushing.start()
    time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    pushing.join(timeout=120)
    generation = int(cluster.get("/readyz").headers["X-Clipbank-Generation"])
    if answers and answers[0].status_code == 201:
        generation = max(generation, answers[0].json()["generation"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            now = replica_pids()
        except Exception:  # the broadcast can fail while Ray replaces the replica
            now = {}
        if victim not in now and len(now) == REPLICAS:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"no replacement for replica {victim} within 60 s: {replica_pids()}")
    replicas_at(cluster, generation, deadline_s=30.0)
    recovered = time.monotonic() - t0
    assert recovered < 60, recovered


def test_sixteen_clients_never_see_an_older_generation_than_they_asked_for(cluster, backbone):
    """Clients classify with X-Min-Generation = the newest generation they have seen, while a writer pushes,
    rolls back and deletes: no 5xx, and no answer from before what was asked."""
    bank = empty_bank(backbone)
    stop, newest, problems = threading.Event(), [int(cluster.get("/readyz").headers["X-Clipbank-Generation"])], []

    def client() -> int:
        answered = 0
        with httpx.Client(base_url=str(cluster.base_url), timeout=60) as http:
            while not stop.is_set():
                asked = newest[0]
                response = classify(http, asked)
                got = int(response.headers.get("X-Clipbank-Generation", -1))
                if response.status_code >= 500 or got < asked:
                    problems.append((response.status_code, asked, got, response.text[:200]))
                answered += 1
        return answered

    with ThreadPoolExecutor(16) as pool:
        running = [pool.submit(client) for _ in range(16)]
        for version in (1, 2):
            data = random_bundle(bank, "churn", seed=30 + version, version=version)
            pushed = cluster.post("/tasks", files={"bundle": ("b", data)}, headers=AUTH)
            assert pushed.status_code == 201, pushed.text
            newest[0] = pushed.json()["generation"]
        rolled = cluster.post("/tasks/churn/activate", json={"version": 1}, headers=AUTH)
        newest[0] = int(rolled.headers["X-Clipbank-Generation"])
        deleted = cluster.delete("/tasks/churn", headers=AUTH)
        newest[0] = deleted.json()["generation"]
        time.sleep(1.0)
        stop.set()
        answered = sum(f.result() for f in running)
    assert answered > 16 and problems == []

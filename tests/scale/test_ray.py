"""clipbank on Ray Serve: a local Ray cluster, 2 replicas of the unchanged app, one S3 store (moto on 127.0.0.1).

One cluster for the module (starting Ray takes seconds); skipped when the `[scale]` extra is not installed.
"""

from __future__ import annotations

import socket
import threading
import time

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


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    import boto3

    from service.config import ServeConfig
    from service.ray_engine import APP_NAME, application

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
            serve.run(application(config), name=APP_NAME, route_prefix="/")
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


def test_min_generation_reads_your_writes_or_503(cluster):
    current = int(cluster.get("/readyz").headers["X-Clipbank-Generation"])
    ok = classify(cluster, current)
    assert ok.status_code == 200 and int(ok.headers["X-Clipbank-Generation"]) >= current
    ahead = classify(cluster, current + 1000)
    assert ahead.status_code == 503 and ahead.headers["Retry-After"] == "1"
    assert ahead.json()["error"]["code"] == "stale_replica"
    bad = classify(cluster, "soon")  # type: ignore[arg-type]
    assert bad.status_code == 400 and "X-Min-Generation" in bad.json()["error"]["message"]


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

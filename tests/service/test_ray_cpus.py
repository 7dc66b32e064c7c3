"""`clipbank serve --engine ray --replicas N` with N above the cluster's CPUs: each replica reserves one CPU, so
the replicas Ray could not place were never started and `serve.run` waited for ever, with no word from clipbank
(Ray's controller log alone said so). On a local cluster each replica now reserves an equal share of its CPUs
(Ray's count, which honours a container's limit), and the server says they share cores."""

from __future__ import annotations

import logging

from service import ray_engine


def test_replicas_above_a_local_clusters_cpus_share_them_and_it_is_said(caplog):
    with caplog.at_level(logging.WARNING, "clipbank.service"):
        assert ray_engine.replica_cpus(2, 2.0, local=True) is None  # Ray's default: one each
        assert caplog.text == ""
        assert ray_engine.replica_cpus(3, 2.0, local=True) == 2 / 3
        assert "3 replicas on 2 CPUs: they share them" in caplog.text
        caplog.clear()
        assert ray_engine.replica_cpus(6, 4.0, local=False) is None  # a joined cluster: the rest wait for CPUs
        assert "has 4 CPUs and each of the 6 replicas reserves one" in caplog.text
        caplog.clear()
        assert ray_engine.replica_cpus(6, 8.0, local=False) is None and caplog.text == ""


def test_the_deployment_reserves_the_share_it_is_given():
    from service.config import ServeConfig

    app = ray_engine.application(ServeConfig(), replicas=3, cpus=2 / 3)
    options = app._bound_deployment.ray_actor_options
    assert options["num_cpus"] == 2 / 3 and "env_vars" in options["runtime_env"]
    assert ray_engine.application(ServeConfig(), 1)._bound_deployment.ray_actor_options["num_cpus"] == 1  # Ray's


def test_the_driver_warns_of_another_saved_admin_token(tmp_path, monkeypatch, caplog):
    """Under Ray the warning was logged in each replica only, which Ray keeps off the console."""
    import pytest
    import ray

    from service.admin_token import ADMIN_TOKEN_FILE
    from service.config import ServeConfig

    (tmp_path / ADMIN_TOKEN_FILE).write_text("a-saved-token-0123456789\n")

    def init(*a, **k):
        raise RuntimeError("no cluster in this test")

    monkeypatch.setattr(ray, "init", init)
    config = ServeConfig(store=str(tmp_path), admin_token="s" * 20, engine="ray")
    with pytest.raises(RuntimeError, match="no cluster"):
        ray_engine.run(config)
    assert "is not accepted here" in caplog.text


def test_the_driver_says_when_the_address_it_logs_is_not_served_or_a_replica_cannot_read_the_store(monkeypatch, caplog):
    """An outside check: on a joined cluster whose Serve instance already ran on another port, the server logged
    "2 replicas on http://...:18692" where nothing listened (Ray only logs that it ignored the new port); and
    replicas started without the store's credentials served a degraded bank with 200s, the driver silent."""
    import http.server
    import threading

    from service.config import ServeConfig

    class Other(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # Serve's proxy without our application: a 404 for every path
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    async def announce(self, generation, timeout_s):
        return {"r1": 3, "r2": "store error at generation 0: could not read the index (NoCredentialsError)"}

    monkeypatch.setattr(ray_engine.RayPeers, "announce", announce)
    try:
        with caplog.at_level(logging.WARNING, "clipbank.service"):
            ray_engine.say_what_serves(ServeConfig(host="0.0.0.0", port=server.server_address[1]))
    finally:
        server.shutdown()
    said = f"GET http://127.0.0.1:{server.server_address[1]}/healthz from this machine answered 404, not 200"
    assert said in caplog.text and "keeps the address it was started with" in caplog.text
    assert "replica r2 does not serve the store's bank: store error" in caplog.text and "r1" not in caplog.text


def test_a_cluster_that_refuses_the_connection_is_a_one_line_error_naming_token_auth(monkeypatch, caplog):
    """Following the cluster recipe on a cluster with Ray's token authentication: "Failed to connect to Ray
    cluster" after 20 lines of InvalidAuthToken, with no word of authentication. Exit 3 and the hint now."""
    import ray

    from service.config import ServeConfig

    def refuse(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379")

    monkeypatch.setattr(ray, "init", refuse)
    config = ServeConfig(engine="ray", ray_address="127.0.0.1:6379", admin_token="a-token-of-sixteen-chars")
    with caplog.at_level(logging.ERROR, "clipbank.service"):
        assert ray_engine.run(config) == 3
    assert "Failed to connect to Ray cluster" in caplog.text and "RAY_AUTH_MODE=token" in caplog.text


def test_a_driver_stopped_after_another_deployed_clipbank_leaves_it_serving(monkeypatch, caplog):
    """An outside check: a second `clipbank serve --engine ray` (to change --replicas) took over the application;
    stopping the first then deleted it, and every request got a 404 from Ray's proxy. Each driver marks the
    application as held in Ray's KV store before it deploys (Ray's status does not change on a redeploy)."""
    import pytest

    ray = pytest.importorskip("ray")
    from ray import serve

    from service import ray_owners
    from tests.service.test_ray_owners import FakeKV

    kv, jobs = FakeKV(), iter(["01000000", "02000000"])
    monkeypatch.setattr(ray_owners, "_kv", lambda: kv)
    monkeypatch.setattr(ray_owners, "_this_job", lambda: next(jobs))
    monkeypatch.setattr(ray_owners, "_ended_jobs", set)
    deleted: list[str] = []
    monkeypatch.setattr(serve, "delete", lambda name: deleted.append(name))
    monkeypatch.setattr(serve, "shutdown", lambda: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    first = ray_engine.claim()
    second = ray_engine.claim()  # another driver deployed since
    with caplog.at_level("INFO", logger="clipbank.service"):
        ray_engine._close(local=False, owner=first)
        assert deleted == [] and "it is left serving" in caplog.text
        ray_engine._close(local=False, owner=None)  # stopped before deploying: nothing of its own to delete
        assert deleted == [] and "stopped before deploying" in caplog.text
    ray_engine._close(local=False, owner=second)  # the last holder
    ray_engine._close(local=True, owner=first)  # a cluster started here goes, whatever runs on it
    assert deleted == [ray_engine.APP_NAME] * 2

    def broken(*a, **k):
        raise ConnectionError("the cluster is gone")

    monkeypatch.setattr(ray_owners, "_kv", broken)
    with caplog.at_level("WARNING", logger="clipbank.service"):
        ray_engine._close(local=False, owner=second)
    assert deleted == [ray_engine.APP_NAME] * 2 and "could not tell" in caplog.text


def test_ray_address_in_the_environment_joins_a_cluster_as_the_flag_does(monkeypatch):
    """Set in RAY_ADDRESS, the cluster was taken for one started here: stopping shut Serve down for every app."""
    import pytest

    ray = pytest.importorskip("ray")
    from service.config import ServeConfig

    seen = {}

    def cpus(replicas, total, local):
        seen["local"] = local
        raise RuntimeError("stop here")

    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray_engine, "replica_cpus", cpus)
    for env, local in (("127.0.0.1:6379", False), (None, True), ("local", True)):  # `local`: start one here
        if env:
            monkeypatch.setenv("RAY_ADDRESS", env)
        else:
            monkeypatch.delenv("RAY_ADDRESS", raising=False)
        with pytest.raises(RuntimeError, match="stop here"):
            ray_engine.run(ServeConfig(admin_token="a" * 20, engine="ray"))
        assert seen["local"] is local

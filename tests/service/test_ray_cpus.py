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

    from service.config import ServeConfig
    from service.lifecycle import ADMIN_TOKEN_FILE

    (tmp_path / ADMIN_TOKEN_FILE).write_text("a-saved-token-0123456789\n")

    def init(*a, **k):
        raise RuntimeError("no cluster in this test")

    monkeypatch.setattr(ray, "init", init)
    config = ServeConfig(store=str(tmp_path), admin_token="s" * 20, engine="ray")
    with pytest.raises(RuntimeError, match="no cluster"):
        ray_engine.run(config)
    assert "is not accepted here" in caplog.text

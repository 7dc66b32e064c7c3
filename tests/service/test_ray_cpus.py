"""`clipbank serve --engine ray --replicas N` with N above the machine's cores: each replica reserves one CPU, so
the replicas Ray could not place were never started and `serve.run` waited for ever, with no word from clipbank
(Ray's controller log alone said so). A local cluster now declares a CPU per replica and says they share cores."""

from __future__ import annotations

import logging

from service import ray_engine


def test_a_local_cluster_has_a_cpu_for_every_replica_and_says_when_they_share_cores(monkeypatch, caplog):
    monkeypatch.setattr(ray_engine.os, "cpu_count", lambda: 2)
    assert [ray_engine.local_cpus(n) for n in (1, 2, 3, 8)] == [2, 2, 3, 8]
    with caplog.at_level(logging.WARNING, "clipbank.service"):
        ray_engine._check_cpus(2, 2.0, local=True)
        assert caplog.text == ""
        ray_engine._check_cpus(3, 3.0, local=True)
        assert "3 replicas on 2 cores: they share them" in caplog.text
        caplog.clear()
        ray_engine._check_cpus(6, 4.0, local=False)  # a joined cluster: the rest wait for CPUs
        assert "has 4 CPUs and each of the 6 replicas reserves one" in caplog.text
        caplog.clear()
        ray_engine._check_cpus(6, 8.0, local=False)
        assert caplog.text == ""

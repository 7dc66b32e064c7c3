"""The compute thread's thread count: PyTorch's default capped by the CPUs the process may use (its affinity and
its cgroup's CPU quota), or the `threads` setting."""

from __future__ import annotations

import os

import pytest

from service.config import ServeConfig
from service.threads import cgroup_cpus, compute_threads, usable_cpus


def _v2(tmp_path, text):
    tmp_path.mkdir()
    (tmp_path / "cpu.max").write_text(text)
    return tmp_path


def _v1(tmp_path, quota, period):
    (tmp_path / "cpu").mkdir(parents=True)
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return tmp_path


def test_the_cgroup_quota_is_read_from_v2_and_v1(tmp_path):
    assert cgroup_cpus(_v2(tmp_path / "a", "150000 100000\n")) == 1.5
    assert cgroup_cpus(_v2(tmp_path / "b", "max 100000\n")) is None  # no quota
    assert cgroup_cpus(_v1(tmp_path / "c", 50000, 100000)) == 0.5
    assert cgroup_cpus(_v1(tmp_path / "d", -1, 100000)) is None
    assert cgroup_cpus(tmp_path / "nothing") is None
    assert cgroup_cpus(_v2(tmp_path / "e", "garbage")) is None


def test_a_quota_caps_the_threads_and_the_setting_overrides(tmp_path, monkeypatch):
    """A container limited to 1.5 CPUs on a 64-core host: 2 threads, not PyTorch's 64."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert usable_cpus(_v2(tmp_path / "a", "150000 100000")) == 2
    assert usable_cpus(_v2(tmp_path / "b", "max 100000")) == 64
    assert usable_cpus(_v2(tmp_path / "c", "10000 100000")) == 1  # a tenth of a CPU is still one thread
    monkeypatch.setattr("service.threads.CGROUP", tmp_path / "a")
    assert compute_threads(0, 64, narrow=False) == 2
    assert compute_threads(0, 1, narrow=False) == 1  # OMP_NUM_THREADS=1 (as Ray Serve sets it) stays 1
    assert compute_threads(3, 64, narrow=False) == 3  # the operator's setting
    assert compute_threads(0, 64, narrow=True) == 1  # tiny: one thread measured faster, idle and beside a busy process
    assert compute_threads(2, 64, narrow=True) == 2


def test_threads_far_over_the_cpus_are_warned_of(monkeypatch, caplog):
    """An outside check's: --threads 1000 on 2 CPUs was taken silently and served 90 times slower than one."""
    import logging

    monkeypatch.setattr("service.threads.usable_cpus", lambda: 2)
    with caplog.at_level(logging.WARNING, logger="clipbank.service"):
        assert compute_threads(4, 64, narrow=False) == 4
        assert not caplog.records
        assert compute_threads(1000, 64, narrow=False) == 1000  # the operator's, still; said
    assert "threads=1000 is over twice the 2 CPUs this process may use" in caplog.text


def test_the_setting_is_checked_up_front():
    with pytest.raises(ValueError, match="threads must be in 0..1024"):
        ServeConfig(threads=-1)
    assert ServeConfig(threads=1).threads == 1


def test_the_container_image_sets_the_serving_variables_as_clipbank_serve_does():
    """The image's ENV carries each of them, with the same value (its entrypoint is `clipbank serve` too, but an
    operator's `docker run ... python -m ...` should not lose them)."""
    from pathlib import Path

    from service.threads import SERVING_ENV
    from tests.docker.dockerfile import env_values, parse

    root = Path(__file__).resolve().parents[2]
    env = env_values(parse((root / "docker" / "Dockerfile").read_text()).stages[-1].instructions)
    assert {k: env.get(k) for k in SERVING_ENV} == SERVING_ENV


def test_an_operators_value_wins_and_an_empty_one_means_the_librarys_default():
    from service.threads import SERVING_ENV, set_serving_env

    env = {"OMP_WAIT_POLICY": "ACTIVE", "MKL_DISABLE_FAST_MM": "", "OTHER": "x"}
    set_serving_env(env)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OTHER": "x"}
    fresh: dict[str, str] = {}
    set_serving_env(fresh)
    assert fresh == SERVING_ENV


@pytest.mark.anyio
async def test_readyz_says_how_many_threads_each_pass_runs_on(tmp_path, backbone):
    from tests.service.conftest import running_app

    async with running_app(tmp_path / "a", backbone) as client:
        assert (await client.get("/readyz")).json()["threads"] == 1  # tiny: one, by default
    async with running_app(tmp_path / "b", backbone, threads=2, autocast="bf16") as client:
        ready = (await client.get("/readyz")).json()
        assert (ready["threads"], ready["autocast"]) == (2, "bf16")  # autocast was shown nowhere

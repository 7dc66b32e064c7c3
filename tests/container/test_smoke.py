"""The real image and compose file, run: docker/smoke.py end to end, each of its steps asserted.

Skipped unless CLIPBANK_CONTAINER_TESTS=1 and a Docker engine answers. It builds the CPU image (several minutes
the first time), so it is not part of the default run. On a host without Docker Hub or PyTorch's index:

    CLIPBANK_CONTAINER_TESTS=1 CLIPBANK_SMOKE_ARGS="--local-base --torch-index-url https://pypi.org/simple" \\
        python -m pytest tests/container -m container

(the CA bundle that `PIP_CERT` names, if set, is passed to the build as a BuildKit secret).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.docker.repo import ROOT

STEPS = [
    "build", "hygiene", "bundle", "up", "user", "healthcheck", "push", "classify",
    "read_only", "idle_rss", "restart", "down_up", "sigterm", "store_intact",
]  # fmt: skip


def engine_answers() -> bool:
    docker = os.environ.get("DOCKER", "docker")
    if shutil.which(docker) is None:
        return False
    return subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode == 0


pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(os.environ.get("CLIPBANK_CONTAINER_TESTS") != "1", reason="set CLIPBANK_CONTAINER_TESTS=1"),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not engine_answers():
        pytest.skip("no Docker engine answers `docker info`")
    out = tmp_path_factory.mktemp("smoke") / "report.json"
    args = shlex.split(os.environ.get("CLIPBANK_SMOKE_ARGS", ""))
    if os.environ.get("PIP_CERT") and "--ca" not in args:
        args += ["--ca", os.environ["PIP_CERT"]]
    done = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "smoke.py"), "--report", str(out), *args],
        capture_output=True, text=True, timeout=3 * 3600,
    )  # fmt: skip
    print(done.stdout[-6000:], done.stderr[-3000:])
    assert out.exists(), f"smoke.py wrote no report (exit {done.returncode}): {done.stderr[-2000:]}"
    return {s["step"]: s for s in json.loads(out.read_text())["steps"]}


@pytest.mark.parametrize("step", STEPS)
def test_smoke_step_passes(report, step):
    assert step in report, f"smoke.py did not run {step}"
    assert report[step]["ok"], report[step].get("error")


def test_figures_are_sane(report):
    assert report["build"]["image_bytes"] > 100e6
    assert report["user"]["uid"] == "10001"
    assert report["classify"]["routed_share"] >= 0.9 and report["classify"]["zero_shot_share"] >= 0.9
    assert 0 < report["idle_rss"]["rss_mib"] < 4096
    assert not report["store_intact"]["problems"]

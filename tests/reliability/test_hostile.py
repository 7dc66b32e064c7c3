"""Every hostile input against a real server: a 4xx in the JSON error shape, within 1 s and 100 MB of extra RSS."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.process import server_process
from model_store.bank import empty_bank
from tests.helpers import random_bundle
from tests.reliability.hostile import CASES, Target
from tests.reliability.payloads import png_of

TOKEN = "hostile-admin-token-0123456789"
MAX_SECONDS = 1.0
MAX_EXTRA_RSS = 100 * 1024 * 1024
pytestmark = pytest.mark.slow
MEASURED: dict[str, tuple[float, int]] = {}  # case -> (seconds, extra peak RSS bytes)


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak(pid: int) -> int:
    """Reset the process's peak RSS to its current RSS (Linux: clear_refs 5) and return that RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status_kb(pid, "VmRSS")


@pytest.fixture(scope="module")
def target(tmp_path_factory, backbone):
    tmp = tmp_path_factory.mktemp("hostile")
    env = {
        "CLIPBANK_ADMIN_TOKEN": TOKEN,
        "CLIPBANK_FROZEN_RUNTIME": "torch",
        "CLIPBANK_HEAD_TIMEOUT_SECONDS": "0.5",  # the timeout cases then finish within the case budget
        "CLIPBANK_READ_TIMEOUT_SECONDS": "0.5",
        "CLIPBANK_KEEP_ALIVE_SECONDS": "0.2",
        "CLIPBANK_GATE_MAX_ZERO_SHOT": "1",  # a random bundle's selector claims most outside images; see test_gate
    }
    bundle = random_bundle(empty_bank(backbone), "hostile", seed=11)
    log = tmp / "server.log"
    with server_process(tmp / "store", (), env, log, ready_seconds=180) as (url, pid):
        with httpx.Client(timeout=30) as client:
            yield Target(url, int(url.rsplit(":", 1)[1]), TOKEN, bundle, client), pid, log


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_gets_a_cheap_named_4xx(target, case):
    t, pid, _ = target
    send = case.build(t)  # the payload is made before the clock starts
    before = _reset_peak(pid)
    started = time.perf_counter()
    status, body = send()
    seconds = time.perf_counter() - started
    extra = _status_kb(pid, "VmHWM") - before
    MEASURED[case.name] = (seconds, extra)
    assert status == case.status, (status, body[:300])
    error = json.loads(body)["error"]
    assert set(error) - {"details"} == {"code", "message"} and error["message"], error
    # an image's error says which image (an index); too many images, how many the server takes
    assert set(error.get("details", {})) in ({"image"}, {"setting", "limit"}, set()), error
    if case.code is not None:
        assert error["code"] == case.code, error
    assert seconds < MAX_SECONDS, f"{case.name} took {seconds:.2f}s"
    assert extra < MAX_EXTRA_RSS, f"{case.name} raised peak RSS by {extra / 2**20:.0f} MB"


def test_after_the_table_the_server_still_serves_and_logged_no_traceback(target):
    t, _, log = target
    r = t.client.post(t.url + "/classify", files=[("images", ("a.png", png_of()))], data={"labels": ["a", "b"]})
    assert r.status_code == 200, r.text
    assert "Traceback" not in log.read_text(errors="replace")


def test_unknown_methods_do_not_grow_the_metrics(target):
    t, _, _ = target
    t.client.get(t.url + "/healthz")
    size = len(t.client.get(t.url + "/metrics").content)
    for i in range(300):
        assert t.raw(f"M{i:04d} /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())[0] == 405
    grown = len(t.client.get(t.url + "/metrics").content) - size
    assert grown < 2000, f"/metrics grew by {grown} bytes after 300 unknown methods"


def test_the_table_is_large_and_was_measured(target, capsys):
    assert len(CASES) >= 60 and len({c.name for c in CASES}) == len(CASES)
    if len(MEASURED) < len(CASES):
        pytest.skip("only part of the table ran (selected with -k)")
    slowest = max(MEASURED.items(), key=lambda kv: kv[1][0])
    heaviest = max(MEASURED.items(), key=lambda kv: kv[1][1])
    with capsys.disabled():
        print(
            f"\nhostile table: {len(CASES)} cases; slowest {slowest[0]!r} {slowest[1][0]:.3f}s; "
            f"most extra peak RSS {heaviest[0]!r} {heaviest[1][1] / 2**20:.1f} MB"
        )

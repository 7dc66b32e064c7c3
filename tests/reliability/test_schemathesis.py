"""Schemathesis against the real app in process: thousands of generated requests, with and without tokens, no 5xx."""

from __future__ import annotations

import base64
import itertools
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.python import asgi

from model_store.bank import empty_bank
from service.app import create_app
from service.config import ServeConfig
from tests.helpers import random_bundle
from tests.reliability.payloads import full_png

pytestmark = pytest.mark.slow

TOKEN = "fuzz-admin-token-0123456789"
WRONG_TOKEN = "fuzz-wrong-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
TASK = "fuzz"
VARIANTS = ("no token", "admin token", "wrong token")
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
# per operation, token variant and mode (an operation without inputs has a single case); a deeper run sets
# CLIPBANK_FUZZ_EXAMPLES (180 took 107 s of the suite, 120 took 77 s)
EXAMPLES = int(os.environ.get("CLIPBANK_FUZZ_EXAMPLES", "120"))
MIN_CASES = EXAMPLES * 50  # 8,640 cases ran at 120
# past this, no further operation is started (a guard against a run that never ends, not a speed goal: about 110
# requests a second here); every operation must still have been fuzzed
BUDGET_SECONDS = max(420, EXAMPLES * 4)
REQUEST_SECONDS = 10
PNG = full_png(8, 8)
HEADER_CASES = itertools.count()


@dataclass
class Target:
    """The running app, the schema schemathesis read from it, and one ASGI session for every call."""

    schema: schemathesis.BaseSchema
    client: asgi.ASGIClient
    bundle: bytes

    def put_task_back(self) -> None:
        """Route to the fuzz task again after a generated DELETE stopped routing to it or purged it."""
        r = self.client.post(f"/tasks/{TASK}/activate", json={"version": 1}, headers=ADMIN)
        if r.status_code == 404:
            r = self.client.post("/tasks", files={"bundle": ("fuzz.safetensors", self.bundle)}, headers=ADMIN)
        assert r.status_code in (200, 201), r.text


@dataclass
class Tally:
    """What the run did: cases per (operation, token variant), statuses, and the failures found."""

    cases: Counter[tuple[str, str]] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def out_of_time(self) -> bool:
        return time.monotonic() - self.started > BUDGET_SECONDS


@pytest.fixture
def target(tmp_path, backbone) -> Iterator[Target]:
    # gate_max_zero_shot=1: the random bundle's selector claims most outside images (tests/service/test_gate.py)
    config = ServeConfig(
        store=str(tmp_path / "store"), admin_token=TOKEN, frozen_runtime="torch", gate_max_zero_shot=1.0
    )
    app = create_app(config, backbone=backbone)
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the app's lifespan
        with asgi.get_client(app) as client:
            deadline = time.monotonic() + 60
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the app did not get ready within 60 s"
                time.sleep(0.05)
            target = Target(schema, client, random_bundle(empty_bank(backbone), TASK, seed=1))
            target.put_task_back()
            yield target
    finally:
        asgi.shutdown_lifespans()  # schemathesis keeps an app's lifespan running until told otherwise


def _needs_token(operation: APIOperation) -> bool:
    return bool(operation.definition.raw.get("security"))


def _modes(operation: APIOperation) -> tuple[GenerationMode, ...]:
    """Both modes, except for an operation without inputs, which has no invalid request to make (X-Request-ID, any
    string, has no invalid value: /healthz and /metrics take no other input)."""
    headers = [h for h in operation.headers if h.name.lower() != "x-request-id"]
    parts = (operation.path_parameters, operation.query, headers, operation.cookies, operation.body)
    return MODES if any(len(p) for p in parts) or _needs_token(operation) else MODES[:1]


def _aim(case: Case, variant: str) -> None:
    """Send no token, the admin token, or a wrong one (the one schemathesis generated, if it made one)."""
    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    if variant == "admin token":
        headers["Authorization"] = f"Bearer {TOKEN}"
    elif variant == "wrong token":
        # schemathesis makes random tokens, and malformed headers in negative mode
        headers["Authorization"] = (case.headers or {}).get("Authorization", f"Bearer {WRONG_TOKEN}")
    case.headers = headers


def _use_real_inputs(case: Case) -> None:
    """Name the fuzz task and send decodable images, so that the generated options reach the hot-swap and the
    inference code instead of stopping at the first 404 or 422."""
    if "task" in (case.path_parameters or {}):
        case.path_parameters["task"] = TASK
    body = case.body
    if case.operation.path == "/classify" and isinstance(body, dict) and isinstance(body.get("images"), list):
        real = base64.b64encode(PNG).decode() if case.media_type == "application/json" else PNG
        body["images"] = [real] * min(len(body["images"]), 4)


def _mostly_without_min_generation(case: Case) -> None:
    """Keep a generated X-Min-Generation in 1 case of 4: a generation the server lacks (503) or a malformed one
    (400) is answered before the route, so the other cases go without it and reach the route."""
    if "X-Min-Generation" in (case.headers or {}) and next(HEADER_CASES) % 4:
        del case.headers["X-Min-Generation"]


def _check(case: Case, response: schemathesis.Response, variant: str) -> None:
    status = response.status_code
    shown = f"{case.operation.label} ({variant}) got {status}: {response.text[:500]}\n{case.as_curl_command()}"
    if status == 503 and response.json()["error"]["code"] == "stale_replica":  # asked for a generation to come
        assert response.json()["error"]["details"]["wanted"] > response.json()["error"]["details"]["generation"]
        return
    assert status < 500, shown
    if status >= 400:
        try:
            body = response.json()
        except ValueError:
            body = None
        assert isinstance(body, dict) and set(body) == {"error"}, f"not the error shape: {shown}"
        error = body["error"]
        assert isinstance(error, dict) and set(error) - {"details"} == {"code", "message"}, f"not the shape: {shown}"
        assert all(isinstance(error[k], str) and error[k] for k in ("code", "message")), f"not the shape: {shown}"
        details = error.get("details", {})  # an image's index, or a count limit (no gate runs: no bundle passes)
        assert isinstance(details, dict) and set(details) in ({"image"}, {"setting", "limit"}, set()), (
            f"not the error shape: {shown}"
        )
    elif _needs_token(case.operation) and variant != "admin token":
        raise AssertionError(f"succeeded without the admin token: {shown}")


def _fuzz(target: Target, operation: APIOperation, variant: str, mode: GenerationMode, tally: Tally) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode), real=st.booleans())
    def run(case: Case, real: bool) -> None:
        if real:
            _use_real_inputs(case)
        _mostly_without_min_generation(case)
        _aim(case, variant)
        try:
            response = case.call(session=target.client, timeout=REQUEST_SECONDS)
        except Exception as e:  # in process, an unhandled error reaches the caller after the 500 is sent
            raise AssertionError(f"{type(e).__name__}: {e}\n{case.as_curl_command()}") from e
        tally.cases[operation.label, variant] += 1
        tally.statuses[response.status_code] += 1
        _check(case, response, variant)
        if operation.method.upper() == "DELETE" and response.status_code == 200:
            target.put_task_back()

    try:
        run()
    except Exception as e:  # every operation is fuzzed; the failures are reported together
        tally.failures.append(f"{operation.label} [{variant}, {mode.value}]: {e}")


def test_generated_requests_never_get_a_5xx_and_every_4xx_is_the_error_shape(target):
    tally = Tally()
    operations = [result.ok() for result in target.schema.get_all_operations()]
    for operation in operations:
        for variant in VARIANTS:
            for mode in _modes(operation):
                if not tally.out_of_time():
                    _fuzz(target, operation, variant, mode, tally)
    seconds = time.monotonic() - tally.started
    total = sum(tally.cases.values())
    print(f"schemathesis: {total} cases in {seconds:.0f} s, statuses {dict(sorted(tally.statuses.items()))}")
    assert not tally.failures, "\n\n".join(tally.failures)
    assert total >= MIN_CASES, f"only {total} cases ran"
    missed = [(o.label, v) for o in operations for v in VARIANTS if not tally.cases[o.label, v]]
    stopped = f" (the run stopped at its budget of {BUDGET_SECONDS} s)" if tally.out_of_time() else ""
    assert not missed, f"operations never called{stopped}: {missed}"

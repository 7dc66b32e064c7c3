"""Service fixtures: bundles trained in this session, and an in-process app with its lifespan running."""

from __future__ import annotations

from contextlib import asynccontextmanager

import anyio
import httpx
import pytest

from service.app import create_app
from service.config import Limits, ServeConfig

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


RANDOM_BUNDLES_GATE = 1.0


@asynccontextmanager
async def running_app(tmp_path, backbone, limits: Limits | None = None, proxy_request_ids: bool = False, **settings):
    """An app on a fresh store under `tmp_path`, ready, with an httpx client talking to it in process.

    The frozen passes stay in PyTorch unless a test asks otherwise: the shared backbone must not change runtime.
    Most service tests push random bundles (tests/helpers.py), whose selectors claim most outside images: the
    interference gate refuses those by default (tests/service/test_gate.py), so here it lets any zero-shot
    capture through unless a test sets `gate_max_zero_shot`.
    """
    settings.setdefault("frozen_runtime", "torch")
    settings.setdefault("gate_max_zero_shot", RANDOM_BUNDLES_GATE)
    settings.setdefault("store", str(tmp_path / "store"))
    config = ServeConfig(admin_token=TOKEN, limits=limits or Limits(), **settings)
    app = create_app(config, backbone=backbone, proxy_request_ids=proxy_request_ids)
    async with app.router.lifespan_context(app):
        with anyio.fail_after(60):
            await app.state.service.ready.wait()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://clipbank") as client:
            client.app = app
            yield client


@asynccontextmanager
async def failed_app(config: ServeConfig, backbone=None):
    """An app whose start-up fails: yields (client, fatal messages) once it has reported the failure."""
    failures: list[str] = []
    app = create_app(config, backbone=backbone, on_fatal=failures.append)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://clipbank") as client:
            with anyio.fail_after(60):
                await app.state.service.failed.wait()
            yield client, failures

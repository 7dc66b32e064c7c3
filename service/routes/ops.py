"""Operations: liveness, readiness (with degraded tasks named), Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..schemas import ErrorResponse, Health
from . import service_of


def ops_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", response_model=Health, response_model_exclude_unset=True)  # /readyz has the bank's
    async def healthz(request: Request) -> dict:
        """Live: the process answers (200 even while loading). `degraded` names tasks that cannot be served."""
        service = service_of(request)
        details = service.health()
        status = "failed" if service.failed.is_set() else "degraded" if any(details.values()) else "live"
        return {"status": status, **details}

    @router.get("/readyz", response_model=Health, responses={503: {"model": ErrorResponse}})
    async def readyz(request: Request) -> Any:
        """Ready: backbone loaded, bank built, warm-up done (503 until then). Degraded tasks do not stop it."""
        service = service_of(request)
        bank = service.require_ready().bank
        details = service.health()
        return {
            "status": "degraded" if any(details.values()) else "ready",
            **details,
            "generation": bank.generation,
            "tasks": list(bank.task_names),
            "backbone": bank.backbone.describe(),
            "frozen_runtime": bank.backbone.frozen.name,
            "threads": service.threads,
            "autocast": bank.backbone.autocast,
        }

    @router.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"}},
    )
    async def metrics(request: Request) -> Response:
        """Prometheus text format."""
        return Response(service_of(request).metrics.render(), media_type="text/plain; version=0.0.4")

    return router

"""Operations: liveness, readiness (with degraded tasks named), Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from model_store.errors import StoreError

from ..schemas import ErrorResponse, Health
from . import service_of


def ops_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", response_model=Health, response_model_exclude_unset=True)  # /readyz has the bank's
    async def healthz(request: Request) -> dict:
        """Live: the process answers (200 even while loading). `degraded` names tasks that cannot be served."""
        service = service_of(request)
        details = service.health()
        status = "failed" if service.failed.is_set() else "degraded" if _degraded(details) else "live"
        return {"status": status, **details}

    @router.get("/readyz", response_model=Health, responses={503: {"model": ErrorResponse}})
    async def readyz(request: Request) -> Any:
        """Ready: backbone loaded, bank built from the store, warm-up done (503 until then). Degraded tasks, and a
        store that fails after a bank was read from it (the server keeps serving that bank), do not stop it."""
        service = service_of(request)
        registry = service.require_ready()
        if not registry.store_read:  # a balancer must not send task traffic to a server that has no task
            raise StoreError(
                f"this server has not read its store since it started ({registry.store_error}): it answers with "
                "zero-shot CLIP alone, no task, until a poll reads it"
            )
        bank = registry.bank
        details = service.health()
        return {
            "status": "degraded" if _degraded(details) else "ready",
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


def _degraded(details: dict) -> bool:
    """Tasks left out of the bank, or a store whose index cannot be read (a read-only store serves all it has)."""
    return bool(details["degraded"] or details["store_error"])

"""What live traffic says (admin token): versions in shadow, and the traffic no task claims (docs/safety.md)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool

from model_store.errors import NoShadow, TaskDegraded
from model_store.manifest import shown

from ..auth import TokenCheck
from ..decode import read_json
from ..schemas import ActivateRequest, ShadowInfo, TaskInfo, UnclaimedInsights
from ..tasks import task_info
from ..watch import in_turn
from . import ERRORS, POSTED, WAITED, known_query, service_of
from .tasks import ACTIVATE_BODY, Wait, announced, known_name


async def _changed(request: Request, task: str, wait: str, what: str, change: Callable[[], Any]) -> tuple[dict, Any]:
    """Make the `change` (off the event loop), then tell the other replicas (`announced`): the task as it now is,
    and what `change` returned."""
    registry = service_of(request).require_ready()
    before = registry.bank.generation
    result = await run_in_threadpool(change)
    generation = registry.bank.generation
    replicas = await announced(request, generation, wait, what, before)
    entry = await run_in_threadpool(registry.task_entry, task)
    return {**task_info(registry.bank, task, entry), "replicas": replicas, "generation": generation}, result


def watch_router(admin: TokenCheck) -> APIRouter:
    router = APIRouter(tags=["tasks"], dependencies=[Depends(admin), Depends(known_query)], responses=ERRORS)

    @router.get("/tasks/{task}/shadow", response_model=ShadowInfo)
    async def get_shadow(request: Request, task: str) -> dict:
        """What the task's version in shadow would do to live traffic since it entered the shadow on this server."""
        service = service_of(request)
        registry = service.require_ready()
        entry = await run_in_threadpool(registry.task_entry, known_name(task))
        stats = service.watch.shadows.stats(task)
        failed = registry.bank.shadow_degraded.get(entry.shadow) if entry.shadow is not None else None
        if stats is None and failed is not None:  # it never will be, until its blob is restored (a new generation)
            raise TaskDegraded(f"the version of task {shown(task)} in shadow is not scored: {failed}")
        if stats is None:
            why = (
                "has no version in shadow"
                if entry.shadow is None
                else "has a version in shadow this server does not score yet"
            )
            raise NoShadow(f"task {shown(task)} {why}")
        return {**stats, "replica": service.replica}

    @router.post("/tasks/{task}/shadow", response_model=TaskInfo, openapi_extra=ACTIVATE_BODY, responses=POSTED)
    async def put_in_shadow(request: Request, task: str, wait: Wait = "none") -> dict:
        """Put a stored version in shadow (replacing the one there); promote it later with activate."""
        registry = service_of(request).require_ready()
        body = await read_json(request, ActivateRequest)
        shadow = partial(registry.shadow, known_name(task), body.version)
        info, gate = await _changed(request, task, wait, f"version {body.version} of {task} in shadow", shadow)
        return {**info, "gate": gate}

    @router.delete("/tasks/{task}/shadow", response_model=TaskInfo, responses=WAITED)
    async def end_shadow(request: Request, task: str, wait: Wait = "none") -> dict:
        """Stop scoring traffic with the task's version in shadow (it stays stored)."""
        registry = service_of(request).require_ready()
        stop = partial(registry.shadow, known_name(task), None)
        return (await _changed(request, task, wait, f"the end of {task}'s shadow", stop))[0]

    @router.get("/insights/unclaimed", response_model=UnclaimedInsights, tags=["insights"])
    async def unclaimed(
        request: Request,
        min_share: Annotated[
            float, Query(gt=0, le=1, allow_inf_nan=False, description="a cluster's least share of auto traffic")
        ] = 0.03,
        min_size: Annotated[int, Query(ge=2, le=100_000, description="a cluster's fewest members")] = 20,
        max_clusters: Annotated[int, Query(ge=1, le=100)] = 20,
        examples: Annotated[
            int, Query(ge=0, le=16, description="thumbnails per cluster (when the server keeps them: opt-in)")
        ] = 0,
    ) -> dict:
        """Images no task claimed, clustered: each cluster's size, share of auto traffic over time, and the nearest
        task with its score margin (how far that task is from claiming them). A cluster is a domain to train.
        With `examples`, each cluster also shows thumbnails of its most typical images, if the server keeps them
        (`unclaimed_thumbnails`)."""
        service = service_of(request)
        bank = service.require_ready().bank
        found = await in_turn(service.watch, bank, min_share, min_size, max_clusters, examples)
        return {**found, "replica": service.replica}

    return router

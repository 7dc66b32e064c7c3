"""Task management (admin token): upload a bundle, list tasks, activate a version, stop routing to a task."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from model_store.errors import ClipbankError, InvalidRequest, StoreError, TaskNotFound
from model_store.gate import InterferenceRefused
from model_store.manifest import shown
from model_store.modes import TASK_RE
from model_store.replacement import stored_replacement_notes
from model_store.store_base import needed_by

from ..auth import TokenCheck
from ..decode import read_bundle_upload, read_json
from ..errors import ReplicasLagging
from ..schemas import ActivateRequest, Removed, TaskInfo, TaskList, TaskUploaded, UploadMode
from ..tasks import task_info
from . import ERRORS, POSTED, WAITED, known_query, service_of

log = logging.getLogger("clipbank.service")

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["bundle"],
                    "additionalProperties": False,
                    "properties": {"bundle": {"type": "string", "format": "binary"}},
                }
            }
        },
    }
}
RESTORED = "the very bytes of a stored version whose blob was damaged or missing: its blob restored (`restored: true`)"
UPLOAD_ROUTE: dict[str, Any] = {
    "status_code": 201,
    "response_model": TaskUploaded,
    "openapi_extra": UPLOAD_BODY,
    "responses": {200: {"model": TaskUploaded, "description": RESTORED}, **POSTED},
}


ACTIVATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ActivateRequest.model_json_schema()}},
    }
}


def known_name(task: str) -> str:
    """A path's task name, or 404 before any work when no task could have it."""
    if not TASK_RE.fullmatch(task):
        raise TaskNotFound(f"task {shown(task)} is not a task name ({TASK_RE.pattern})")
    return task


MODE_HELP = (
    "active (the default): route to it; inactive: store it only; shadow: store it and score live traffic with its "
    "selector without answering any request (GET /tasks/{task}/shadow)"
)


def _upload_mode(mode: UploadMode | None, activate: bool | None) -> UploadMode:
    """`mode`, or what the older `activate` flag says; both given must agree (activate=false goes with inactive or
    shadow, which clients send for servers older than `mode`)."""
    if mode is not None and activate is not None and activate != (mode == "active"):
        raise InvalidRequest(f"mode={mode} contradicts activate={str(activate).lower()}: give mode alone")
    if mode is not None:
        return mode
    return "inactive" if activate is False else "active"


WAIT_HELP = (
    "all: answer once every live replica serves the change's generation (504 replicas_lagging naming the others after "
    "10 s; the change is stored either way); none: tell them and answer at once"
)
Wait = Annotated[Literal["none", "all"], Query(description=WAIT_HELP)]


async def announced(
    request: Request, generation: int, wait: str, what: str, before: int | None = None
) -> dict[str, Any]:
    """Tell the other replicas of a change stored at `generation`; with wait=all, 504 naming each replica that did
    not answer, or answered from an older generation. `what` says what is stored, for that message and the log's
    line of the change (an outside check could not tell from the log which version went live: only "bank
    generation 5: 2 tasks"); `before`: the generation before it, when the change may have written nothing (an
    activation of the active version), which is then not logged."""
    if before is None or generation != before:
        log.info("stored: %s, generation %d", what, generation)
    replicas = await service_of(request).announce(generation, wait == "all")
    behind = {r: g for r, g in replicas.items() if not isinstance(g, int) or g < generation}
    if behind:
        raise ReplicasLagging(
            f"{what} is stored (generation {generation}), but {len(behind)} of {len(replicas)} replicas did not "
            f"serve it in time: {', '.join(sorted(behind))}",
            {"generation": generation, "replicas": replicas},
        )
    return replicas


def _add_reading(router: APIRouter) -> None:
    """GET /tasks and GET /tasks/{task}."""

    @router.get("/tasks", response_model=TaskList)
    async def list_tasks(request: Request) -> dict:
        """Every stored task: versions, the active one, classes, metrics, memory, and what this server serves."""
        registry = service_of(request).require_ready()
        bank = registry.bank
        try:
            index = await run_in_threadpool(registry.index)
        except StoreError as e:  # what this server serves still, said beside why the store cannot be listed
            served = [{"task": t.name, "version": t.version, "bundle_id": t.bundle_id} for t in bank.tasks]
            e.details = {"serving": served, "generation": bank.generation}  # type: ignore[attr-defined]
            raise
        return {
            "generation": index.generation,
            "tasks": [task_info(bank, t, e, index.generation) for t, e in sorted(index.tasks.items())],
        }

    @router.get("/tasks/{task}", response_model=TaskInfo)
    async def get_task(request: Request, task: str) -> dict:
        registry = service_of(request).require_ready()
        entry = await run_in_threadpool(registry.task_entry, known_name(task))
        index = await run_in_threadpool(registry.index)  # read after the entry: its generation is not older
        return task_info(registry.bank, task, entry, index.generation)


def tasks_router(admin: TokenCheck) -> APIRouter:
    router = APIRouter(tags=["tasks"], dependencies=[Depends(admin), Depends(known_query)], responses=ERRORS)
    # One upload at a time past its body: a bundle's parse, trial run and gate took 3.4x its bytes, and two
    # uploads of 248 MB at once took the server from 1.1 to 2.7 GB (a security check). Changes are one at a time
    # under the store's lock anyway; what waits here holds only its body, which max_buffered_bytes bounds.
    one_at_a_time = asyncio.Lock()

    @router.post("/tasks", **UPLOAD_ROUTE)
    async def upload(
        request: Request,
        response: Response,
        mode: Annotated[UploadMode | None, Query(description=MODE_HELP)] = None,
        activate: bool | None = Query(None, description="the older spelling of mode: false is mode=inactive"),
        force: bool = Query(False, description="override the interference gate (logged and counted; docs/safety.md)"),
        wait: Wait = "none",
    ) -> dict:
        """Upload a bundle: validated, stored, and (by default) swapped in as the task's active version."""
        service = service_of(request)
        registry = service.require_ready()
        chosen = _upload_mode(mode, activate)  # before the body is read
        data = await read_bundle_upload(request, service.config.limits)
        async with one_at_a_time:
            before = await run_in_threadpool(_index_or_none, registry)  # the store's active version, which it replaces
            result = await run_in_threadpool(registry.upload, data, chosen == "active", force, chosen == "shadow")
        state, notes = chosen, []
        if result.restored:  # nothing new was created: a stored version's blob was written back
            response.status_code = 200
            state = await run_in_threadpool(_stored_state, registry, result.task, result.bundle_id)
        else:
            compared = (registry.store, before, result.task, result.version, chosen != "active")  # the store's index,
            notes = await run_in_threadpool(stored_replacement_notes, *compared)  # not this server's bank
        how = "(restored)" if result.restored else f"({chosen}{', force' * force})"
        replicas = await announced(request, result.generation, wait, f"version {result.version} of {result.task} {how}")
        return {**vars(result), "state": state, "replicas": replicas, "warnings": notes}

    _add_reading(router)
    _add_activation(router)
    _add_removal(router)
    return router


def _add_activation(router: APIRouter) -> None:
    @router.post("/tasks/{task}/activate", response_model=TaskInfo, openapi_extra=ACTIVATE_BODY, responses=POSTED)
    async def activate(
        request: Request,
        task: str,
        force: bool = Query(False, description="override the interference gate (logged and counted; docs/safety.md)"),
        wait: Wait = "none",
    ) -> dict:
        """Make a stored version active: rollback or roll forward, hot-swapped."""
        registry = service_of(request).require_ready()
        body = await read_json(request, ActivateRequest)  # read after the token check, not before
        before, index = registry.bank.generation, await run_in_threadpool(_index_or_none, registry)
        try:
            gate = await run_in_threadpool(registry.activate, known_name(task), body.version, force)
        except InterferenceRefused as e:  # said plainly when the version failed the gate as it was stored, too
            if await run_in_threadpool(_failed_when_stored, registry, task, body.version):
                raise InterferenceRefused(e.report, failed_when_stored=True) from None
            raise
        generation = registry.bank.generation
        what = f"the activation of {task} version {body.version}" + (" (force)" if force else "")
        replicas = await announced(request, generation, wait, what, before)
        entry = await run_in_threadpool(registry.task_entry, task)
        notes = await run_in_threadpool(stored_replacement_notes, registry.store, index, task, body.version, False)
        info = task_info(registry.bank, task, entry)
        return {**info, "replicas": replicas, "gate": gate, "generation": generation, "warnings": notes}


def _index_or_none(registry: Any) -> Any:
    """The store's index (None when it cannot be read now: the upload says why, if it fails for it)."""
    try:
        return registry.index()
    except (ClipbankError, OSError):
        return None


def _stored_state(registry: Any, task: str, bundle_id: str) -> str | None:
    """Where a stored version is: active, shadow or inactive (None: the store cannot say now)."""
    try:
        record = registry.index().tasks.get(task)
    except (ClipbankError, OSError):
        return None
    if record is None:
        return None
    return "active" if record.active == bundle_id else "shadow" if record.shadow == bundle_id else "inactive"


def _failed_when_stored(registry: Any, task: str, version: int) -> bool:
    """Whether the gate report kept beside a stored version failed (its last check: inactive, shadow, forced)."""
    try:
        gate = registry.store.version(task, version).gate
    except (ClipbankError, OSError):
        return False
    return isinstance(gate, dict) and gate.get("passed") is False


def _add_removal(router: APIRouter) -> None:
    """DELETE /tasks/{task}."""

    @router.delete("/tasks/{task}", response_model=Removed, responses=WAITED)
    async def remove(
        request: Request,
        task: str,
        purge: bool = Query(False, description="also forget the task and delete blobs no other task needs"),
        wait: Wait = "none",
    ) -> dict:
        """Stop routing to a task. Its versions stay stored for rollback unless purged."""
        registry = service_of(request).require_ready()
        before = registry.bank.generation
        purged, was_active = await run_in_threadpool(registry.deactivate, known_name(task), purge)
        kept = await run_in_threadpool(_kept, registry.store, task) if purge else {}
        shadow = None if purge else await run_in_threadpool(_shadow_version, registry, task)
        generation = registry.bank.generation
        what = f"the {'purge' if purge else 'deactivation'} of {task}"
        replicas = await announced(request, generation, wait, what, before)
        return {
            "task": task,
            "was_active": was_active,
            "shadow_version": shadow,
            "purged_blobs": purged,
            "kept": kept,
            "generation": generation,
            "replicas": replicas,
        }


def _shadow_version(registry: Any, task: str) -> int | None:
    """The version of `task` left in shadow by a deactivation (it keeps scoring traffic), if any."""
    try:
        entry = registry.task_entry(task)
    except (ClipbankError, OSError):
        return None
    record = entry.record_of(entry.shadow)
    return record.version if record is not None else None


def _kept(store: Any, task: str) -> dict[int, list[str]]:
    """What the purge kept, from the index it left; {} if the index cannot be read now (the purge stands)."""
    try:
        return needed_by(store.index(), task)
    except (ClipbankError, OSError):
        return {}

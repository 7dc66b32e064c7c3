"""The FastAPI app: /classify, hot-swap /tasks, health, readiness and metrics, built by `create_app(config)`."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sys
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from model_store.backbone import Backbone, load_backbone
from model_store.errors import BundleFormatError, InvalidRequest
from model_store.frozen import TorchFrozen
from model_store.inference import ZERO_SHOT, ClassifyItem, ImageResult, TextCache, classify_batch
from model_store.store import LocalStore

from .auth import TokenCheck
from .batching import Batcher, BatchInfo
from .config import Limits, ServeConfig
from .errors import LimitExceeded, NotReady, UnsupportedMediaType, install_handlers
from .images import decode_base64, preprocess_all
from .memory import release_free_memory
from .metrics import Metrics
from .middleware import BodyLimit, RequestMetrics
from .registry import Registry
from .schemas import (
    ActivateRequest,
    ClassifyJSON,
    ClassifyOptions,
    ClassifyResponse,
    ErrorResponse,
    Health,
    Removed,
    TaskInfo,
    TaskList,
    TaskUploaded,
)
from .tasks import task_info

log = logging.getLogger("clipbank.service")
SMALL_BODY = 1024 * 1024
FORM_PARTS = 100_000
ERRORS = {s: {"model": ErrorResponse} for s in (401, 404, 409, 413, 415, 422, 503)}


class Service:
    """The app's state: settings, metrics, and once loaded, the registry and the batcher."""

    def __init__(self, config: ServeConfig, backbone: Backbone | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.token_generated = config.admin_token is None
        self.admin_token = config.admin_token or secrets.token_urlsafe(24)
        self.backbone = backbone
        self.registry: Registry | None = None
        self.batcher: Batcher | None = None
        self.error: str | None = None
        self.ready = asyncio.Event()
        self.failed = asyncio.Event()

    def load(self) -> None:
        """Backbone, store, bank, warm-up: everything before /readyz turns 200 (runs off the event loop)."""
        if self.backbone is None:
            self.backbone = load_backbone(self.config.backbone, self.config.device)
        self._frozen_runtime()
        cache = TextCache(self.config.text_cache_size, self.config.text_cache_mb * 1024 * 1024)
        self.registry = Registry(LocalStore(self.config.store), self.backbone, self.metrics, cache)
        bank = self.registry.load()
        warm = torch.zeros(1, 3, self.backbone.image_size, self.backbone.image_size)
        items = [ClassifyItem(warm, ("a", "b"), ZERO_SHOT)] + [ClassifyItem(warm, None, t) for t in bank.task_names]
        # First-call costs, and every task's class embeddings into the cache.
        for item, out in zip(items, classify_batch(bank, items, cache)):
            if isinstance(out, Exception):
                log.error("warm-up of %s failed: %s: %s", item.task, type(out).__name__, out)
        self.metrics.watch_cache(cache)
        self.batcher = Batcher(
            lambda: self.registry.bank,
            self.config.max_batch,
            self.config.max_wait_ms,
            cache,
            self.metrics,
            self.config.max_queue_images,
        )
        self.batcher.start()

    def _frozen_runtime(self) -> None:
        """`onnx` fails the start if it cannot be used; `auto` uses it on CPU and falls back to torch, saying why."""
        wanted = self.config.frozen_runtime
        if wanted == "torch" or (wanted == "auto" and self.backbone.device.type != "cpu"):
            if self.backbone.frozen.name != "torch":  # a backbone object shared with another app
                self.backbone.frozen = TorchFrozen(self.backbone.model)
            return
        if self.backbone.frozen.name == "onnx":
            return
        from model_store.onnx_runtime import use_onnx_runtime

        try:
            use_onnx_runtime(self.backbone, self.config.onnx_cache or None)
        except Exception as e:  # noqa: BLE001 - export, cache, file system and ONNX Runtime errors alike
            if wanted == "onnx":
                raise
            log.warning("frozen passes stay in PyTorch: %s: %s", type(e).__name__, e, exc_info=e)

    def require_ready(self) -> Registry:
        if not self.ready.is_set() or self.registry is None:
            raise NotReady(self.error or "the server is still loading the backbone and the bank")
        return self.registry


def _service(request: Request) -> Service:
    return request.app.state.service


async def _poll_store(service: Service) -> None:
    """Pick up changes other servers made to a shared store, and return freed heap memory to the system."""
    while True:
        await asyncio.sleep(service.config.poll_seconds)
        try:
            await run_in_threadpool(service.registry.refresh)
            await run_in_threadpool(release_free_memory)  # what requests and uploads freed since the last poll
        except Exception:  # noqa: BLE001 - keep polling; the store may come back
            log.exception("polling the store failed")


def _lifespan(on_fatal: Callable[[str], None] | None):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service: Service = app.state.service
        if service.token_generated:
            print(f"clipbank: admin token (generated, shown once): {service.admin_token}", file=sys.stderr, flush=True)
        poller: asyncio.Task | None = None

        async def start() -> None:
            nonlocal poller
            try:
                await run_in_threadpool(service.load)
            except Exception as e:  # noqa: BLE001 - reported by /readyz and on_fatal
                service.error = f"start-up failed: {type(e).__name__}: {e}"
                log.error("%s", service.error, exc_info=e)
                service.failed.set()
                if on_fatal is not None:
                    on_fatal(service.error)
                return
            service.ready.set()
            poller = asyncio.create_task(_poll_store(service))
            log.info("ready: %s", json.dumps(service.registry.bank.describe()))

        starter = asyncio.create_task(start())
        try:
            yield
        finally:
            starter.cancel()
            if poller is not None:
                poller.cancel()
            if service.batcher is not None:
                await run_in_threadpool(service.batcher.stop)

    return lifespan


def create_app(
    config: ServeConfig | None = None,
    backbone: Backbone | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """The app. `backbone` skips loading one (tests share theirs); `on_fatal` is told if start-up fails."""
    config = config or ServeConfig.from_env()
    service = Service(config, backbone)
    app = FastAPI(
        title="clipbank",
        summary="A frozen CLIP plus a bank of hot-swappable task experts, routed per image.",
        version="0.1.0",
        lifespan=_lifespan(on_fatal),
    )
    app.state.service = service
    install_handlers(app)
    admin = TokenCheck(lambda: service.admin_token, "admin")
    reader = TokenCheck(lambda: config.classify_token, "classify", also=lambda: service.admin_token)
    app.include_router(_classify_routes(reader))
    app.include_router(_task_routes(admin))
    app.include_router(_ops_routes())
    app.add_middleware(BodyLimit, limit_for=_limit_for(config))
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    return app


def _limit_for(config: ServeConfig) -> Callable[[str, str], tuple[int, str]]:
    limits = config.limits

    def limit_for(method: str, path: str) -> tuple[int, str]:
        if method == "POST" and path.rstrip("/") == "/tasks":
            return limits.max_upload_bytes, "max_upload_bytes"
        if path.rstrip("/") == "/classify":
            return limits.max_request_bytes, "max_request_bytes"
        return SMALL_BODY, "max_body_bytes"

    return limit_for


# ----------------------------------------------------------------------------------------------- classify

MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["images"],
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "Image files."},
        "labels": {"type": "array", "items": {"type": "string"}, "description": "Repeat the field per label."},
        "task": {"type": "string", "default": "auto"},
        "route": {"type": "string", "enum": ["per-image", "per-request"], "default": "per-image"},
        "top_k": {"type": "integer", "minimum": 1},
    },
}


def _classify_routes(reader: TokenCheck) -> APIRouter:
    router = APIRouter(tags=["classify"])

    @router.post(
        "/classify",
        response_model=ClassifyResponse,
        responses=ERRORS,
        dependencies=[Depends(reader)],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {"schema": MULTIPART_SCHEMA},
                    "application/json": {"schema": ClassifyJSON.model_json_schema()},
                },
            }
        },
    )
    async def classify(request: Request) -> ClassifyResponse:
        """Classify images among candidate labels, each image routed to a task's experts or to zero-shot CLIP."""
        service = _service(request)
        service.require_ready()
        started = time.perf_counter()
        files, options = await _read_classify(request, service.config)
        images = await run_in_threadpool(preprocess_all, files, service.backbone.preprocess, service.config.limits)
        decoded = time.perf_counter()
        item = ClassifyItem(images, tuple(options.labels) or None, options.task, options.route, options.top_k)
        results, info = await service.batcher.submit(item)
        return _classify_response(results, info, (decoded - started) * 1000, (time.perf_counter() - started) * 1000)

    return router


async def _read_classify(request: Request, config: ServeConfig) -> tuple[list[tuple[str, bytes]], ClassifyOptions]:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limits = config.limits
    if kind in ("multipart/form-data", "application/x-www-form-urlencoded"):
        # Counts are checked below with our own limits; the body size already bounds the parser.
        form = await request.form(max_files=FORM_PARTS, max_fields=FORM_PARTS)
        files, fields = [], {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "images":
                    raise InvalidRequest(f"unexpected file field {key!r}; send images in the field 'images'")
                if len(files) >= limits.max_images:
                    raise LimitExceeded(f"more than max_images={limits.max_images} images in one request")
                files.append((f"image {len(files)} ({value.filename or 'unnamed'})", await value.read()))
            elif key == "labels":
                fields.setdefault("labels", []).append(value)
            elif key == "images":
                raise InvalidRequest("the field 'images' must carry files, not text")
            else:
                fields[key] = value
        options = _options(ClassifyOptions, fields)
    elif kind == "application/json":
        body = await request.body()
        options, files = await run_in_threadpool(_parse_json_classify, body, limits)
    else:
        raise UnsupportedMediaType(
            f"Content-Type {kind or 'none'!r}: send multipart/form-data (files) or application/json (base64)"
        )
    _check_labels(options.labels, config)
    return files, options


def _parse_json_classify(body: bytes, limits: Limits) -> tuple[ClassifyJSON, list[tuple[str, bytes]]]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, huge ints, deep nesting
        raise InvalidRequest(f"the body is not valid JSON: {str(e)[:200]}") from None
    parsed = _options(ClassifyJSON, payload)
    if len(parsed.images) > limits.max_images:
        raise LimitExceeded(f"{len(parsed.images)} images in one request; the limit is max_images={limits.max_images}")
    return parsed, [(f"image {i}", decode_base64(s, f"image {i}", limits)) for i, s in enumerate(parsed.images)]


def _options(model: type[ClassifyOptions], data: Any) -> Any:
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()[:10])
        raise InvalidRequest(problems) from None


def _check_labels(labels: list[str], config: ServeConfig) -> None:
    limits = config.limits
    if len(labels) > limits.max_labels:
        raise LimitExceeded(f"{len(labels)} labels; the limit is max_labels={limits.max_labels}")
    for i, label in enumerate(labels):
        if len(label) > limits.max_label_chars:
            raise LimitExceeded(
                f"label {i} is {len(label)} characters; the limit is max_label_chars={limits.max_label_chars}"
            )
        if not label.strip():
            raise InvalidRequest(f"label {i} is empty")
        try:
            label.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(f"label {i} is not valid Unicode text (lone surrogate)") from None


def _classify_response(results: list[ImageResult], info: BatchInfo, decode_ms: float, total_ms: float) -> dict:
    return {
        "results": [
            {"labels": [{"label": lb, "score": s} for lb, s in r.labels], "route": vars(r.route)} for r in results
        ],
        "timing": {
            "decode_ms": round(decode_ms, 3),
            "queue_ms": round(info.queue_ms, 3),
            "compute_ms": round(info.compute_ms, 3),
            "total_ms": round(total_ms, 3),
            "batch_images": info.batch_images,
            "batch_requests": info.batch_requests,
            "generation": info.generation,
        },
    }


# ----------------------------------------------------------------------------------------------- tasks


def _task_routes(admin: TokenCheck) -> APIRouter:
    router = APIRouter(tags=["tasks"], dependencies=[Depends(admin)], responses=ERRORS)

    @router.post(
        "/tasks",
        status_code=201,
        response_model=TaskUploaded,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["bundle"],
                            "properties": {"bundle": {"type": "string", "format": "binary"}},
                        }
                    }
                },
            }
        },
    )
    async def upload(
        request: Request, activate: bool = Query(True, description="false: store the version without routing to it")
    ) -> dict:
        """Upload a bundle: validated, stored, and (by default) swapped in as the task's active version."""
        registry = _service(request).require_ready()
        data = await _read_bundle_field(request)
        result = await run_in_threadpool(registry.upload, data, activate)
        return vars(result)

    @router.get("/tasks", response_model=TaskList)
    async def list_tasks(request: Request) -> dict:
        """Every stored task: versions, the active one, classes, metrics and memory."""
        registry = _service(request).require_ready()
        index = await run_in_threadpool(registry.store.index)
        infos = [await run_in_threadpool(task_info, registry, t, e) for t, e in sorted(index["tasks"].items())]
        return {"generation": int(index["generation"]), "tasks": infos}

    @router.get("/tasks/{task}", response_model=TaskInfo)
    async def get_task(request: Request, task: str) -> dict:
        registry = _service(request).require_ready()
        entry = await run_in_threadpool(registry.store.task, task)
        return await run_in_threadpool(task_info, registry, task, entry)

    @router.post("/tasks/{task}/activate", response_model=TaskInfo)
    async def activate(request: Request, task: str, body: ActivateRequest) -> dict:
        """Make a stored version active: rollback or roll forward, hot-swapped."""
        registry = _service(request).require_ready()
        await run_in_threadpool(registry.activate, task, body.version)
        entry = await run_in_threadpool(registry.store.task, task)
        return await run_in_threadpool(task_info, registry, task, entry)

    @router.delete("/tasks/{task}", response_model=Removed)
    async def remove(
        request: Request,
        task: str,
        purge: bool = Query(False, description="also forget the task and delete blobs no other task needs"),
    ) -> dict:
        """Stop routing to a task. Its versions stay stored for rollback unless purged."""
        registry = _service(request).require_ready()
        purged = await run_in_threadpool(registry.deactivate, task, purge)
        return {"task": task, "purged_blobs": purged, "generation": registry.bank.generation}

    return router


async def _read_bundle_field(request: Request) -> bytes:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        raise UnsupportedMediaType(f"Content-Type {kind or 'none'!r}: upload the bundle as multipart field 'bundle'")
    form = await request.form(max_files=1, max_fields=4)
    bundle = form.get("bundle")
    if not isinstance(bundle, UploadFile):
        raise BundleFormatError("send the bundle file in the multipart field 'bundle'")
    return await bundle.read()


# ----------------------------------------------------------------------------------------------- operations


def _ops_routes() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz", response_model=Health)
    async def healthz(request: Request) -> dict:
        """Live: the process answers. 200 even while loading."""
        service = _service(request)
        return {"status": "failed" if service.failed.is_set() else "live"}

    @router.get("/readyz", response_model=Health, responses={503: {"model": ErrorResponse}})
    async def readyz(request: Request) -> Any:
        """Ready: backbone loaded, bank built, warm-up done. 503 until then."""
        registry = _service(request).require_ready()
        bank = registry.bank
        return {
            "status": "ready",
            "generation": bank.generation,
            "tasks": list(bank.task_names),
            "backbone": bank.backbone.describe(),
            "frozen_runtime": bank.backbone.frozen.name,
        }

    @router.get("/metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        """Prometheus text format."""
        return Response(_service(request).metrics.render(), media_type="text/plain; version=0.0.4")

    return router

"""POST /classify: read, check and decode the images, then wait for the batcher's answer."""

from __future__ import annotations

import json
import math
import time

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from model_store.errors import ClipbankError
from model_store.inference import ClassifyItem, ImageResult
from model_store.modes import AUTO, PER_IMAGE, ROUTE_MODES, ZERO_SHOT

from ..auth import TokenCheck
from ..config import Limits
from ..decode import check_answer_size, check_routed_answer_size, read_classify
from ..images import inspect_all, preprocess_opened
from ..schemas import ClassifyJSON, ClassifyResponse
from ..steps import BatchInfo
from ..workers import while_connected
from . import ERRORS, SENT, known_query, service_of


def multipart_schema(limits: Limits) -> dict:
    """The multipart form of `POST /classify`, with this server's limits."""
    return {
        "type": "object",
        "required": ["images"],
        "additionalProperties": False,
        "properties": {
            "images": {
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "minItems": 1,
                "maxItems": limits.max_images,
                "description": "Image files (PNG, JPEG, WEBP, GIF, BMP, TIFF).",
            },
            "labels": {
                "type": "array",
                "items": {"type": "string", "minLength": 1, "maxLength": limits.max_label_chars},
                "maxItems": limits.max_labels,
                "uniqueItems": True,
                "description": "Repeat the field per label.",
            },
            "task": {"type": "string", "default": AUTO, "maxLength": 64},
            "route": {"type": "string", "enum": list(ROUTE_MODES), "default": PER_IMAGE},
            "top_k": {"type": "integer", "minimum": 1},
            "match_labels": {"type": "boolean", "default": True},
        },
    }


def json_schema(limits: Limits) -> dict:
    """The JSON form of `POST /classify`, with this server's limits (the multipart form's)."""
    schema = ClassifyJSON.model_json_schema()
    schema["properties"]["images"]["maxItems"] = limits.max_images
    labels = schema["properties"]["labels"]
    labels["maxItems"], labels["items"]["maxLength"] = limits.max_labels, limits.max_label_chars
    return schema


# a generated client must send each label as a part of its own: one JSON part '["cat","dog"]' is one label
MULTIPART_ENCODING = {"labels": {"style": "form", "explode": True, "contentType": "text/plain"}}


def classify_router(reader: TokenCheck | None, limits: Limits) -> APIRouter:
    """The classify route; `reader` checks the classify token (None: open, and the OpenAPI says so)."""
    router = APIRouter(tags=["classify"])

    @router.post(
        "/classify",
        response_model=ClassifyResponse,
        responses={**ERRORS, **SENT},
        dependencies=[*([Depends(reader)] if reader is not None else []), Depends(known_query)],  # the token first
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {"schema": multipart_schema(limits), "encoding": MULTIPART_ENCODING},
                    "application/json": {"schema": json_schema(limits)},
                },
            }
        },
    )
    async def classify(request: Request) -> Response:
        """Classify images among candidate labels, each image routed to a task's experts or to zero-shot CLIP."""
        service = service_of(request)
        service.require_ready()
        limits, backbone = service.config.limits, service.backbone
        started = time.perf_counter()
        files, options = await read_classify(request, limits)
        if options.task not in (AUTO, ZERO_SHOT):  # a pin the bank cannot answer: refused before any decoding or
            _refuse_unserved(request, service.registry.bank, options.task)  # pass (the batch checks it again)
        # without labels, each image is answered over its task's classes
        classes = {} if options.labels else {t.name: t.classes for t in service.registry.bank.tasks}
        routed_check = check_answer_size(len(files), options, limits, classes)
        with service.batcher.admit(len(files)):  # refused at once when the queue is full, before any decoding
            opened = await run_in_threadpool(inspect_all, files, limits, backbone.image_size)
            cost = sum(o.decode_cost for o in opened)  # heavy work goes to the low-priority threads
            images = await service.decoders.run(request, cost, preprocess_opened, opened, service.preprocess)
            decoded = time.perf_counter()
            item = ClassifyItem(
                images,
                tuple(options.labels) or None,
                options.task,
                options.route,
                options.top_k,
                match_labels=options.match_labels,
            )
            try:
                answer = service.batcher.submit(item, admitted=True)
                results, info = await while_connected(request, answer, "its answer")
            except ClipbankError as e:  # answered 404 at generation g, while g + 1 had the task, said g + 1
                if (generation := getattr(e, "generation", None)) is not None:
                    request.state.generation = generation
                raise
        request.state.generation = info.generation  # X-Clipbank-Generation: the bank this batch ran on
        if routed_check:
            check_routed_answer_size(results, options, limits, classes)
        body = response(results, info, (decoded - started) * 1000, (time.perf_counter() - started) * 1000)
        # Encoded off the event loop: 64 images x 1000 labels is 64,000 entries (the schema above documents it).
        return Response(await run_in_threadpool(_json_bytes, body), media_type="application/json")

    return router


def _refuse_unserved(request: Request, bank, task: str) -> None:
    """TaskNotFound or TaskDegraded for a pinned task `bank` does not serve, answered at `bank`'s generation (an
    outside check: such requests were decoded and ran a frozen pass each, counted as batch images)."""
    try:
        bank.task_index(task)
    except ClipbankError:
        request.state.generation = bank.generation
        raise


def _number(v: object) -> object:
    """A non-finite score as null (JSON has no inf or NaN)."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _labels(pairs: list[tuple[str, float]]) -> list[dict]:
    """The ranked labels; one check per image (on this event loop, 64 x 1000 of them), not per score."""
    if math.isfinite(sum(s for _, s in pairs)):  # softmax scores: finite unless a task's weights overflow
        return [{"label": lb, "score": s} for lb, s in pairs]
    return [{"label": lb, "score": _number(s)} for lb, s in pairs]


def _finite(route: dict) -> dict:
    """A route with any non-finite score shown as null."""
    return {k: _number(v) for k, v in route.items()}


def _json_bytes(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def response(results: list[ImageResult], info: BatchInfo, decode_ms: float, total_ms: float) -> dict:
    """The response body, in one conversion from the batcher's results."""
    return {
        "results": [{"labels": _labels(r.labels), "route": _finite(vars(r.route))} for r in results],
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

"""What the OpenAPI document says of the headers every route has (`middleware.Generations`,
`request_ids.RequestIds`): the request headers `X-Min-Generation` and `X-Request-ID`, and the response headers
`X-Clipbank-Generation`, `X-Clipbank-Replica` and `X-Request-ID`; on errors `X-Clipbank-Error`, on 503s
`Retry-After`, on 401s `WWW-Authenticate`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from .middleware import ANY_GENERATION

MIN_GENERATION = {
    "name": "X-Min-Generation",
    "in": "header",
    "required": False,
    "schema": {"type": "integer", "minimum": 0, "maximum": 10**18 - 1},
    "description": (
        "Answer only from this store generation or later (for example a push's `generation`, to read your own "
        "writes through any replica). A server behind it reads the store first (up to 5 s); if still behind: 503 "
        "`stale_replica` with Retry-After and `error.details` {generation, wanted}. Not a non-negative integer of "
        "at most 18 digits: 400."
    ),
}
ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
# answered on any path: a bad X-Min-Generation, a server behind it (`stale_replica`) or full (`overloaded`)
HEADER_ERRORS = {
    "400": "`bad_request`: X-Min-Generation is not a non-negative integer of at most 18 digits",
    "503": "`stale_replica` (behind X-Min-Generation), `overloaded` or `not_ready`, with Retry-After",
}
PROBE_ERRORS = {  # what /healthz and /metrics may answer all the same: the HTTP server's own
    "400": "`bad_request`: malformed HTTP",
    "503": "`overloaded`: the server's connection table is full, with Retry-After",
}
RESPONSE_HEADERS = {
    "X-Clipbank-Generation": {
        "schema": {"type": "integer"},
        "description": "The store generation of the bank that answered (of a classification: the bank its batch "
        "ran on). Sent once the server is ready.",
    },
    "X-Clipbank-Replica": {
        "schema": {"type": "string"},
        "description": "The name of the server that answered. Sent once the server is ready.",
    },
    "X-Request-ID": {
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
        "description": "The request's id, as its log lines name it: the client's own `X-Request-ID` when it "
        "matches this pattern, else one the server made.",
    },
}
ERROR_HEADERS = {  # on an error's answer (a Node integrator's generated types had neither)
    "X-Clipbank-Error": {
        "schema": {"type": "string"},
        "description": "The error's `code`, for proxies and logs that read no body.",
    }
}
RETRY_AFTER = {
    "Retry-After": {
        "schema": {"type": "integer"},
        "description": "Seconds to wait before trying again (overloaded, not_ready, stale_replica, "
        "store_unavailable, ...); absent when no retry helps (store_not_writable, store_damaged).",
    }
}
AUTH_HEADER = {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "`Bearer`: how the token is sent."}}
REQUEST_ID = {
    "name": "X-Request-ID",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "An id for this request, echoed in the answer and named in the server's log lines: 1 to 128 "
    "characters from A-Z a-z 0-9 . _ : - (anything else is replaced by an id the server makes; on Ray Serve, "
    "its proxy echoes any value).",
}


def document_generations(app: FastAPI) -> None:
    """Make `app.openapi()` declare the generation headers on every operation and every response."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path, operations in schema.get("paths", {}).items():
                probe = path in ANY_GENERATION  # X-Min-Generation does not hold /healthz and /metrics
                for op in operations.values():
                    op.setdefault("parameters", []).extend((REQUEST_ID,) if probe else (MIN_GENERATION, REQUEST_ID))
                    for status, why in (PROBE_ERRORS if probe else HEADER_ERRORS).items():  # the header's, overloaded
                        op.setdefault("responses", {}).setdefault(status, {"description": why, "content": ERROR_BODY})
                    for status, response in op.get("responses", {}).items():
                        headers = response.setdefault("headers", {})
                        headers.update(RESPONSE_HEADERS)
                        if status[:1] in "45":
                            headers.update(ERROR_HEADERS | {"503": RETRY_AFTER, "401": AUTH_HEADER}.get(status, {}))
            _keep_null_examples(schema)
        return app.openapi_schema

    app.openapi = openapi


def _keep_null_examples(schema: dict[str, Any]) -> None:
    """FastAPI writes the document without its null values, which cut the examples' nulls too: a zero-shot
    route's `{"task": null, ...}` became `{}`, which its own schema refuses. Put the models' examples back whole."""
    from pydantic import BaseModel

    from . import schemas as models

    components = schema.get("components", {}).get("schemas", {})
    for name, model in vars(models).items():
        if isinstance(model, type) and issubclass(model, BaseModel) and name in components:
            examples = (model.model_config.get("json_schema_extra") or {}).get("examples")
            if isinstance(examples, list) and "examples" in components[name]:
                components[name]["examples"] = examples

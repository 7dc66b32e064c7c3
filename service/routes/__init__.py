"""The API's routes, one module per concern: classify, task management, operations."""

from __future__ import annotations

from collections import Counter
from typing import Any

from fastapi import Request

from model_store.errors import InvalidRequest
from model_store.manifest import shown

from ..lifecycle import Service
from ..schemas import ErrorResponse

# what any route may answer; a GET reads no body, so no 415, and changes nothing, so no 409
ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 408, 413, 422, 503)}
SENT = {415: {"model": ErrorResponse}}  # a route that reads a body: one neither multipart nor JSON
# a change: refused by the store (a version conflict) or the gate; asked with ?wait=all, stored, but some replicas
# did not serve it in time
WAITED = {
    409: {"model": ErrorResponse},
    504: {"model": ErrorResponse, "description": "replicas_lagging: `error.details.replicas` says what each serves"},
}
POSTED = {**WAITED, **SENT}  # a change asked with a body


def service_of(request: Request) -> Service:
    return request.app.state.service


def known_query(request: Request) -> None:
    """A 422 for a query parameter the route does not take, before any work. Ignored, a typo changed serving
    with a success status: `POST /tasks?mod=inactive` activated the upload, `DELETE /tasks/t?version=1` took the
    whole task out of routing."""
    route = request.scope.get("route")
    if request.method == "DELETE" and _has_body(request):  # `-d '{"purge": true}'` only deactivated, with a 200
        raise InvalidRequest(
            f"DELETE {request.url.path} takes no body: its options are query parameters "
            f"({', '.join(sorted(_query_names(route.dependant))) if route is not None else 'none'})"
        )
    if route is None or not request.query_params:
        return
    takes = sorted(_query_names(route.dependant))
    unknown = sorted(set(request.query_params) - set(takes))
    if unknown:
        named = ", ".join(shown(u, 40) for u in unknown[:5])
        raise InvalidRequest(
            f"{request.method} {request.url.path} takes no query parameter {named}; "
            f"it takes {', '.join(takes) if takes else 'none'}"
        )
    seen = Counter(name for name, _ in request.query_params.multi_items())
    if twice := sorted(name for name, n in seen.items() if n > 1):  # the last one won: ?mode=inactive&mode=active
        raise InvalidRequest(f"the query parameter {', '.join(twice)} is given more than once; give each once")


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length", "0").strip()
    return "transfer-encoding" in request.headers or (length.isdigit() and int(length) > 0)


def _query_names(dependant: Any) -> set[str]:
    """The query parameters a route's dependant and its sub-dependencies read (FastAPI's `Dependant` tree)."""
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names

"""The API's routes, one module per concern: classify, task management, operations."""

from __future__ import annotations

from fastapi import Request

from ..lifecycle import Service
from ..schemas import ErrorResponse

ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 408, 409, 413, 415, 422, 503)}


def service_of(request: Request) -> Service:
    return request.app.state.service

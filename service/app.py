"""The FastAPI app, built by `create_app(config)`: routes, error handlers and middleware around one Service."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from model_store.backbone import Backbone

from .auth import TokenCheck
from .config import Limits, ServeConfig
from .errors import ClipbankError, install_handlers, takes
from .lifecycle import Service, lifespan
from .middleware import AbsoluteForm, BodyLimit, Generations, HeadAsGet, HeadLimit, RequestMetrics
from .openapi import document_generations
from .request_ids import RequestIds
from .routes.classify import classify_router
from .routes.ops import ops_router
from .routes.tasks import tasks_router
from .routes.watch import watch_router

SMALL_BODY = 1024 * 1024
log = logging.getLogger("clipbank.service")


def create_app(
    config: ServeConfig | None = None,
    backbone: Backbone | None = None,
    on_fatal: Callable[[str], None] | None = None,
    wait_ready: bool = False,
    proxy_request_ids: bool = False,
) -> FastAPI:
    """The app. `backbone` skips loading one (tests share theirs); `on_fatal` is told if start-up fails;
    `wait_ready`: the app's start-up completes only once the bank is loaded (Ray Serve replicas);
    `proxy_request_ids`: the proxy in front answers with the request's `X-Request-ID` (Ray Serve's), so the app
    does not add the header a second time."""
    config = config or ServeConfig.from_env()
    service = Service(config, backbone)
    app = FastAPIOffline(  # /docs and /redoc load Swagger UI and ReDoc from this server, not a CDN
        title="clipbank",
        summary="A frozen CLIP plus a bank of hot-swappable task experts, routed per image.",
        version="0.1.0",
        lifespan=lifespan(on_fatal, wait_ready),
        redirect_slashes=False,  # a 307 to the path without its slash has no error body; a named 404 says it
    )
    app.state.service = service
    install_handlers(app)
    admin = TokenCheck(lambda: service.admin_token, "admin")
    reader = None
    if config.classify_token is not None:
        reader = TokenCheck(lambda: config.classify_token, "classify", also=lambda: service.admin_token)
    routers = (classify_router(reader, config.limits), tasks_router(admin), watch_router(admin), ops_router())
    for router in routers:
        app.include_router(router)
    routes = [r for router in routers for r in router.routes]
    _say_raised_share(config.limits)
    app.add_middleware(
        BodyLimit,
        limit_for=_limit_for(config),
        read_timeout=config.read_timeout_seconds,
        min_rate=config.min_body_rate,
        max_buffered=config.limits.max_buffered_bytes,
        max_per_client=config.limits.client_buffered_bytes,
        routed=lambda scope: takes(app.router.routes, scope, scope["method"]),  # a mistyped URL: 404, not 413
        unauthorized=lambda scope: _token_refusal(routes, scope),  # no token: 401, not 413
    )
    app.add_middleware(Generations, service=service)
    app.add_middleware(HeadLimit)  # inside the metrics: a 431 is counted like any answer
    app.add_middleware(RequestMetrics, metrics=service.metrics, routes=routes)
    app.add_middleware(HeadAsGet)
    app.add_middleware(AbsoluteForm)
    # outside even Starlette's error middleware, so a 500 and its logged traceback carry the id too
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: RequestIds(build(), answer=not proxy_request_ids)  # type: ignore[method-assign]
    document_generations(app)
    return app


def _limit_for(config: ServeConfig) -> Callable[[str, str], tuple[int, str]]:
    limits = config.limits

    def limit_for(method: str, path: str) -> tuple[int, str]:
        if method == "POST" and path.rstrip("/") == "/tasks":
            return limits.max_upload_bytes, "max_upload_bytes"
        if path.rstrip("/") == "/classify":
            return limits.max_request_bytes, "max_request_bytes"
        return SMALL_BODY, ""  # JSON bodies of a few fields: fixed, not a setting

    return limit_for


def _token_refusal(routes: Sequence[BaseRoute], scope: Scope) -> ClipbankError | None:
    """The 401 that the token check of the route taking this request would give, if any."""
    for route in routes:
        if isinstance(route, APIRoute) and route.matches(scope)[0] == Match.FULL:
            checks = [d.call for d in route.dependant.dependencies if isinstance(d.call, TokenCheck)]
            return checks[0].refusal(scope["headers"]) if checks else None
    return None


def _say_raised_share(limits: Limits) -> None:
    """One client may always send one largest body: a smaller per-client share is raised to it, and said so."""
    enforced = limits.client_buffered_bytes
    if enforced and enforced != limits.max_client_buffered_bytes:
        log.warning(
            "max_client_buffered_bytes=%d is below one largest body (max_upload_bytes=%d, max_request_bytes=%d): "
            "one client address may hold %d bytes of bodies at once",
            limits.max_client_buffered_bytes,
            limits.max_upload_bytes,
            limits.max_request_bytes,
            enforced,
        )

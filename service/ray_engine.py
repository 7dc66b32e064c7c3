"""`clipbank serve --engine ray`: the same FastAPI app in every replica of a Ray Serve deployment (docs/scale-out.md).

Nothing of the app is forked: `serve.ingress` gets a builder that calls `create_app` in each replica, so every
replica holds its own batcher and bank snapshot and shares only the store. A replica reports ready once it has
loaded the store's current bank. After a change, the replica that made it tells the others (`broadcast` of
`sync`, best effort); every replica also polls the store, as any server does, as a safety net.

    clipbank serve --engine ray --replicas 2 [--ray-address ADDR]
    serve run service.ray_engine:build_app replicas=2     # settings from the CLIPBANK_* variables

Ray is the `[scale]` extra, imported only here.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from fastapi.concurrency import run_in_threadpool

from .admin_token import resolve_admin_token
from .app import create_app
from .config import ServeConfig
from .lifecycle import Service
from .ray_owners import claim, release
from .server import hangup_signals, say_if_open_to_the_network
from .threads import SERVING_ENV

log = logging.getLogger("clipbank.service")
APP_NAME = "clipbank"
DEPLOYMENT = "clipbank"
SHUTDOWN_SECONDS = 45  # the replicas' graceful 30 s, and Ray's own teardown
LOCAL: dict[str, Service] = {}  # this replica's service, set by the builder in the replica's process


def replica_id() -> str:
    """The Ray Serve replica's id, or the process id outside Ray Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"pid-{os.getpid()}"


def _own_app_name() -> str:
    """The Ray Serve application this replica belongs to; APP_NAME outside a replica."""
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:
        return APP_NAME


class RayPeers:
    """Tells the other replicas of this deployment about a change: `broadcast("sync", generation)`.

    The application's name is the replica's own: `serve run` names it "default" unless given `--name`."""

    def __init__(self, app_name: str | None = None, deployment: str = DEPLOYMENT) -> None:
        self.app_name, self.deployment = app_name, deployment

    async def announce(self, generation: int, timeout_s: float) -> dict[str, Any]:
        """{replica id: the generation it serves, or why it did not answer} for every live replica."""
        from ray import serve

        handle = serve.get_deployment_handle(self.deployment, self.app_name or _own_app_name())
        answers = await handle.broadcast("sync", generation).results_async(timeout_s=timeout_s, return_exceptions=True)
        return reported(answers)


def reported(answers: list[Any]) -> dict[str, Any]:
    """{replica: the generation it serves, or why it does not serve the store's}: a replica whose store cannot be
    read (one replaced under it: its generation may be above the new store's) is named with its error, so a
    change with wait=all counts it as behind."""
    out: dict[str, Any] = {}
    for i, answer in enumerate(answers):
        if not isinstance(answer, dict):
            out[f"replica-{i}"] = f"{type(answer).__name__}: {str(answer)[:120]}"
        elif answer.get("store_error"):  # older releases' answers have no such key
            out[answer["replica"]] = f"store error at generation {answer['generation']}: {answer['store_error'][:160]}"
        else:
            out[answer["replica"]] = answer["generation"]
    return out


def _build(config: ServeConfig):
    """Runs in each replica: the app, with a lifespan that reports ready only once the bank is loaded."""

    def build():
        from service import ray_engine  # the module itself: this function reaches the replica by value

        app = create_app(config, wait_ready=True, proxy_request_ids=True)  # Ray's proxy answers with the id
        service: Service = app.state.service
        service.peers = ray_engine.RayPeers() if config.broadcast else None
        service.replica = service.metrics.replica = ray_engine.replica_id()
        ray_engine.LOCAL["service"] = service
        return app

    return build


class ClipbankReplica:
    """The deployment's class: the app is its ingress; `sync` is what `RayPeers.announce` calls."""

    async def sync(self, generation: int) -> dict[str, Any]:
        from service import ray_engine

        service = ray_engine.LOCAL["service"]
        registry = service.require_ready()
        # Always, even ahead of the change: a store replaced under this replica restarted its generations, maybe
        # to the very one it serves, and reading it again is what finds that out (a store error, reported); a
        # store unchanged costs a read of its index (on S3 a 304).
        await run_in_threadpool(registry.refresh)
        answer = {"replica": service.replica, "generation": registry.bank.generation, "pid": os.getpid()}
        return {**answer, "store_error": registry.store_error} if registry.store_error is not None else answer


def application(config: ServeConfig | None = None, replicas: int | None = None, cpus: float | None = None):
    """The Ray Serve application: `serve.run(application(config))`. `cpus`: what each replica reserves (Ray's
    default, 1, when None)."""
    from ray import serve

    config = config or ServeConfig.from_env()
    env = {"env_vars": {k: os.environ.get(k, v) for k, v in SERVING_ENV.items()}}
    deployment = serve.deployment(
        serve.ingress(_build(config))(ClipbankReplica),
        name=DEPLOYMENT,
        num_replicas=replicas or config.replicas,
        # Ray's default of 5 would cap every batch at 5 single-image requests: room for two full batches
        max_ongoing_requests=2 * config.max_batch,
        graceful_shutdown_timeout_s=30,
        health_check_period_s=5,
        # set in each replica's process before it loads torch (the operator's values, where set, win)
        ray_actor_options={"runtime_env": env, **({"num_cpus": cpus} if cpus is not None else {})},
    )
    return deployment.bind()


class _Stopped(BaseException):
    """SIGINT/SIGTERM while the replicas start: stop there, as after (Ray's driver would dump its stacks). Not an
    Exception, so that no `except Exception` inside Ray turns it into another error."""


def _stopped(*_: object) -> None:
    raise _Stopped()


def run(config: ServeConfig) -> int:
    """`clipbank serve --engine ray`: connect to (or start) a Ray cluster, run the application on
    config.host:config.port, and serve until SIGINT/SIGTERM."""
    import ray
    from ray import serve

    resolve_admin_token(config)  # here too: the replicas' own warning of another saved token goes to Ray's logs only
    # RAY_ADDRESS joins a cluster as --ray-address does (an outside check's stop took its other apps down)
    local = not config.ray_address and os.environ.get("RAY_ADDRESS", "").strip() in ("", "local")
    # A cluster started here gets no dashboard (an open port with no auth of its own); one joined keeps its own.
    try:
        ray.init(
            address=config.ray_address or None, log_to_driver=False, **({"include_dashboard": False} if local else {})
        )
    except ConnectionError as e:  # a cluster with token authentication only says so in its own log lines
        log.error(
            "%s (a cluster that `ray start` said uses token authentication needs RAY_AUTH_MODE=token, and its "
            "token, in this command's environment too: docs/scale-out.md)",
            e,
        )
        return 3
    cpus = replica_cpus(config.replicas, ray.cluster_resources().get("CPU", 0.0), local)
    stop = threading.Event()
    stops = (signal.SIGINT, signal.SIGTERM, *hangup_signals())  # a closed terminal too, unless nohup ignores it
    for sig in stops:
        signal.signal(sig, _stopped)
    owner: str | None = None  # this driver's mark on the application, once it deploys it
    try:
        http = {"host": config.host, "port": config.port, "keep_alive_timeout_s": config.keep_alive_seconds}
        serve.start(http_options=http)
        owner = claim()  # from here this driver holds the application, beside any other that deployed it
        serve.run(application(config, cpus=cpus), name=APP_NAME, route_prefix="/")
        log.info("clipbank on Ray Serve: %d replicas on http://%s:%d", config.replicas, config.host, config.port)
        say_if_open_to_the_network(config)
        say_what_serves(config)  # a signal meanwhile stops it as one during start-up (it takes up to 20 s)
        for sig in stops:
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        log.info("stopping: the replicas finish their requests (up to 30 s)")
    except _Stopped:
        log.info("stopped while the replicas were starting (or being checked)")
    finally:  # the shutdown below is bounded; a second signal must not cut it short with a traceback
        for sig in stops:
            signal.signal(sig, signal.SIG_IGN)
    closing = threading.Thread(target=_close, args=(local, owner), daemon=True)
    closing.start()
    closing.join(SHUTDOWN_SECONDS)
    if closing.is_alive():
        log.warning("Ray did not shut down within %ds; exiting anyway", SHUTDOWN_SECONDS)
    return 0


def say_what_serves(config: ServeConfig) -> None:
    """Warn of what the log line above would hide: a Serve instance already running on a joined cluster keeps its
    own HTTP address (Ray only logs that it ignored ours), and replicas started without the store's settings or
    credentials in their environment (Ray's, on a joined cluster) serve a degraded bank with 200s."""
    import asyncio
    import http.client

    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    shown = f"[{host}]" if ":" in host else host
    try:
        probe = http.client.HTTPConnection(host, config.port, timeout=10)
        probe.request("GET", "/healthz")
        answered = probe.getresponse().status
        probe.close()
    except OSError as e:
        answered = f"{type(e).__name__}: {e}"
    if answered != 200:
        log.warning(
            "GET http://%s:%d/healthz from this machine answered %s, not 200. If this machine is a node of the "
            "cluster, a Serve instance that already ran there keeps the address it was started with (Ray's log "
            "above says it ignored the new one; `serve status` names it), and this --host/--port is not served",
            shown,
            config.port,
            answered,
        )
    try:
        replicas = asyncio.run(RayPeers(APP_NAME).announce(0, 10.0))
    except Exception as e:  # a check: the application itself runs
        log.warning("could not ask the replicas what they serve: %s: %s", type(e).__name__, e)
        return
    for replica, state in sorted(replicas.items()):
        if not isinstance(state, int):
            log.warning("replica %s does not serve the store's bank: %s (docs/scale-out.md)", replica, state)


def replica_cpus(replicas: int, cpus: float, local: bool) -> float | None:
    """What each replica reserves: Ray's 1, or on a local cluster with fewer CPUs (Ray's count, which honours a
    container's limit) than replicas, an equal share, so that every replica is placed (one Ray cannot place
    would leave `serve.run` waiting for ever). They then share cores, and it says so."""
    if replicas <= cpus:
        return None
    if local:
        log.warning(
            "%d replicas on %g CPUs: they share them, so they add no throughput (docs/scale-out.md)", replicas, cpus
        )
        return cpus / replicas
    log.warning(
        "the Ray cluster has %g CPUs and each of the %d replicas reserves one: the rest wait for CPUs (an "
        "autoscaler's new nodes) and start-up waits with them",
        cpus,
        replicas,
    )
    return None


def _close(local: bool, owner: str | None) -> None:
    import ray
    from ray import serve

    others = None if owner is None else release(owner)
    if local or others == 0:  # the replicas drain (graceful_shutdown_timeout_s); a local cluster's is this driver's
        try:
            serve.delete(APP_NAME)
        except Exception as e:  # two last drivers stopping at once both delete it: the second finds none
            log.warning("could not delete the application: %s: %s", type(e).__name__, e)
    elif owner is None:
        log.info("stopped before deploying: the cluster's clipbank application, if any, is left as it was")
    elif others:  # another driver deployed it too (a change of --replicas, either way round): deleting stopped it
        log.warning(
            "%d other clipbank serve driver(s) that deployed the application still run: it is left serving, as the "
            "last deploy made it (its --replicas); the last driver to stop deletes it",
            others,
        )
    else:
        log.warning("could not tell whether another driver holds the application: it is left serving")
    if local:  # a cluster started here goes with it; a joined one keeps running
        serve.shutdown()
    ray.shutdown()


def build_app(args: dict[str, str]):
    """`serve run service.ray_engine:build_app [replicas=N]`: settings from the CLIPBANK_* variables."""
    return application(ServeConfig.from_env(), int(args["replicas"]) if "replicas" in args else None)

"""Which `clipbank serve --engine ray` drivers hold the cluster's clipbank application (Ray's key-value store).

A second driver's `serve.run` takes a running application over (a change of `--replicas`), and Ray's own status
does not change then. Each driver adds itself to the holders just before it deploys, and removes itself when it
stops; only the last one to stop deletes the application. With one mark that the newest driver overwrote, stopping
the newer driver first (a scale-up given up while its replicas waited for CPUs) deleted the application the older
one still ran: every request got a 404 from Ray's proxy (an outside check's). A holder whose Ray job has ended (a
driver killed with SIGKILL) no longer counts.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

log = logging.getLogger("clipbank.service")
OWNER_KEY, OWNER_NAMESPACE = b"serve-application-owner", "clipbank"


def parse_holders(raw: bytes | None) -> list[dict[str, Any]]:
    """The holders as stored: [{"mark", "job"}]. An older clipbank's single mark is one holder of no known job,
    taken as running."""
    if not raw:
        return []
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if isinstance(value, list) and all(isinstance(h, dict) and isinstance(h.get("mark"), str) for h in value):
        return value
    return [{"mark": raw.decode(errors="replace"), "job": None}]


def _read() -> list[dict[str, Any]]:
    from ray.experimental import internal_kv

    return parse_holders(internal_kv._internal_kv_get(OWNER_KEY, namespace=OWNER_NAMESPACE))


def _write(holders: list[dict[str, Any]]) -> None:
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(OWNER_KEY, json.dumps(holders).encode(), overwrite=True, namespace=OWNER_NAMESPACE)


def _ended_jobs() -> set[str]:
    """Ray jobs that have ended (their drivers with them); none when Ray cannot say."""
    try:
        from ray._private import state

        return {str(job["JobID"]) for job in state.jobs() if job.get("IsDead")}
    except Exception:  # a private call: if it moves, holders are only ever kept, never dropped
        return set()


def _this_job() -> str | None:
    import ray

    return ray.get_runtime_context().get_job_id()


def _running(holders: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ended = _ended_jobs()
    return [h for h in holders if h.get("job") is None or h["job"] not in ended]


def claim() -> str:
    """Add this driver to the holders, before it deploys the application; returns its mark."""
    mark = uuid.uuid4().hex
    _write([*_running(_read()), {"mark": mark, "job": _this_job()}])
    return mark


def release(mark: str) -> int | None:
    """Remove this driver from the holders: how many other running drivers hold the application still (0: it is
    this driver's to delete), or None when Ray's key-value store could not say (the driver lost its cluster)."""
    try:
        rest = [h for h in _running(_read()) if h.get("mark") != mark]
        _write(rest)
    except Exception:
        return None
    return len(rest)

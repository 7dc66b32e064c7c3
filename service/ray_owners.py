"""Which `clipbank serve --engine ray` drivers hold the cluster's clipbank application (Ray's key-value store).

A second driver's `serve.run` takes a running application over (a change of `--replicas`), and Ray's own status
does not change then. Each driver adds itself to the holders just before it deploys, and removes itself when it
stops; only the last one to stop deletes the application. With one mark that the newest driver overwrote, stopping
the newer driver first (a scale-up given up while its replicas waited for CPUs) deleted the application the older
one still ran: every request got a 404 from Ray's proxy (an outside check's). Each holder is a key of its own
(`holder/<mark>`, its Ray job as the value), so adding and removing one are single atomic calls: two drivers
stopping at once each see the other. A holder whose Ray job has ended (a driver killed with SIGKILL) no longer counts.
"""

from __future__ import annotations

import logging
import uuid

log = logging.getLogger("clipbank.service")
NAMESPACE = "clipbank"
PREFIX = b"holder/"
OLD_KEY = b"serve-application-owner"  # an older clipbank's single mark: overwritten by any newer deploy anyway


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def _ended_jobs() -> set[str]:
    """Ray jobs that have ended (their drivers with them); none when Ray cannot say."""
    try:
        from ray._private import state

        return {str(job["JobID"]) for job in state.jobs() if job.get("IsDead")}
    except Exception:  # a private call: if it moves, holders are only ever kept, never dropped
        return set()


def _this_job() -> str:
    import ray

    return str(ray.get_runtime_context().get_job_id())


def claim() -> str:
    """Add this driver to the holders, before it deploys the application; returns its mark."""
    kv, mark = _kv(), uuid.uuid4().hex
    kv._internal_kv_put(PREFIX + mark.encode(), _this_job().encode(), overwrite=False, namespace=NAMESPACE)
    kv._internal_kv_del(OLD_KEY, namespace=NAMESPACE)  # its driver, overwritten, would leave the application anyway
    return mark


def release(mark: str) -> int | None:
    """Remove this driver from the holders: how many other running drivers hold the application still (0: it is
    this driver's to delete), or None when Ray's key-value store could not say (the driver lost its cluster)."""
    try:
        kv = _kv()
        kv._internal_kv_del(PREFIX + mark.encode(), namespace=NAMESPACE)
        ended, others = _ended_jobs(), 0
        for key in kv._internal_kv_list(PREFIX, namespace=NAMESPACE):
            job = kv._internal_kv_get(key, namespace=NAMESPACE)
            if job is not None and job.decode(errors="replace") in ended:
                kv._internal_kv_del(key, namespace=NAMESPACE)  # its driver was killed: it holds nothing
            elif job is not None:
                others += 1
    except Exception:
        return None
    return others

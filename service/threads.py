"""How many threads the compute thread's passes use (PyTorch intra-op threads and ONNX Runtime's), and the
native-library variables `clipbank serve` sets before torch loads.

PyTorch's default is the machine's physical cores, whatever CPU quota a container has: on a 64-core host a
container limited to 2 CPUs would run each pass on 32 or 64 threads taking turns on 2 CPUs. And with GNU OpenMP's
own wait policy, one busy process beside the server on 2 cores took auto-routed traffic from 7.8 to 0.6 images/s
on ViT-B-32 and from 118 to 15 on tiny (docs/benchmarks/serve.md, "Threads").
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import MutableMapping
from pathlib import Path

log = logging.getLogger("clipbank.service")

CGROUP = Path("/sys/fs/cgroup")

# Read once, when torch loads its libraries: `clipbank serve` sets them before it imports torch, Ray Serve's
# replicas get them in their runtime environment and the container image in its ENV; an operator's value wins.
SERVING_ENV = {
    # MKL's memory manager keeps every GEMM buffer it allocated, per thread, for reuse; the selectors' GEMMs grow
    # with the bank, so each bank size left bigger buffers behind (memray: 48.6 MB still held after scoring banks
    # of 1 to 100 tiny tasks, 256 bytes without the pool).
    "MKL_DISABLE_FAST_MM": "1",
    # GNU OpenMP's workers spin after each parallel region by default, on cores that ONNX Runtime's frozen pass
    # and any other process need next; with another busy process on the host a pass's regions then wait for
    # descheduled workers. Sleeping at once (PASSIVE) measured faster idle and far faster beside a busy process
    # (docs/benchmarks/serve.md, "Threads").
    "OMP_WAIT_POLICY": "PASSIVE",
}


def set_serving_env(environ: MutableMapping[str, str] | None = None) -> None:
    """SERVING_ENV into `environ` (default os.environ) where the operator has not set a variable. One set to the
    empty string is removed instead: the library's own default (`OMP_WAIT_POLICY= clipbank serve`)."""
    environ = os.environ if environ is None else environ
    for name, value in SERVING_ENV.items():
        given = environ.get(name)
        if given is None:
            environ[name] = value
        elif not given:
            del environ[name]


def cgroup_cpus(root: Path | None = None) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (cgroup v2 `cpu.max`, else v1's CFS quota), or None."""
    root = CGROUP if root is None else root
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cpus(root: Path | None = None) -> int:
    """CPUs this process may run on at once: its affinity, capped by its cgroup's quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpus(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def compute_threads(setting: int, default: int, narrow: bool) -> int:
    """`setting` when given (> 0). Else one thread for a narrow backbone (`Backbone.narrow`, the tiny one): its
    matrices are too small to share, and one thread measured faster for tiny, idle and beside a busy process.
    Else PyTorch's `default` (its physical cores, or OMP_NUM_THREADS when set, as Ray Serve sets it per replica)
    capped by the CPUs this process may use."""
    if setting > 0:
        cpus = usable_cpus()
        if setting > 2 * cpus:  # 1000 threads on 2 CPUs served 90x slower than one
            log.warning(
                "threads=%d is over twice the %d CPUs this process may use: each pass then waits on its own "
                "threads taking turns; 0 picks a number that fits",
                setting,
                cpus,
            )
        return setting
    return 1 if narrow else max(1, min(default, usable_cpus()))

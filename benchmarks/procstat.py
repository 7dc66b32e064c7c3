"""Resident memory of a server process from /proc: VmRSS now, VmHWM since a reset, and a 1 Hz sampler."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

KIB = 1024


def status_bytes(pid: int, field: str) -> int:
    """A `Vm*` field of /proc/<pid>/status, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * KIB
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def rss_bytes(pid: int) -> int:
    return status_bytes(pid, "VmRSS")


def hwm_bytes(pid: int) -> int:
    """The peak RSS since the process started, or since `reset_hwm`."""
    return status_bytes(pid, "VmHWM")


def reset_hwm(pid: int) -> bool:
    """Set VmHWM back to the current RSS (writing 5 to clear_refs); False where the kernel does not allow it."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used (/proc/<pid>/stat); OSError once it has exited."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # a zombie keeps its stat file
        raise ProcessLookupError(f"process {pid} has exited")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def wait_idle(pid: int, seconds: float, busy_below: float = 0.05, every: float = 1.0) -> float | None:
    """Wait until the process used less than `busy_below` of a core over `every` seconds; how long that took,
    or None if it was still busy after `seconds` or has exited."""
    start = time.monotonic()
    try:
        used = cpu_seconds(pid)
        while time.monotonic() - start < seconds:
            threading.Event().wait(every)
            now = cpu_seconds(pid)
            if now - used < busy_below * every:
                return round(time.monotonic() - start, 1)
            used = now
    except OSError:  # the process is gone
        return None
    return None


def available_bytes() -> int:
    """MemAvailable of the machine (/proc/meminfo)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * KIB
    raise RuntimeError("/proc/meminfo has no MemAvailable")


class RssSampler:
    """Samples a process's VmRSS every `every` seconds on its own thread; `on_tick` runs after each sample.

    Above `limit` bytes the process is killed (SIGKILL) and `tripped` says when and at what RSS: a server that
    keeps allocating must not take the machine, and whoever else works on it, down with it.
    """

    def __init__(
        self, pid: int, every: float = 1.0, on_tick: Callable[[], None] | None = None, limit: int | None = None
    ) -> None:
        self.pid, self.every, self.on_tick, self.limit = pid, every, on_tick, limit
        self.samples: list[tuple[float, int]] = []  # (time.monotonic(), bytes)
        self.tripped: tuple[float, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10 * self.every + 10)

    def sample(self) -> int:
        value = rss_bytes(self.pid)
        self.samples.append((time.monotonic(), value))
        return value

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                value = self.sample()
            except (OSError, RuntimeError):  # the process is gone: nothing more to sample
                return
            if self.limit is not None and value > self.limit:
                os.kill(self.pid, signal.SIGKILL)
                self.tripped = (self.samples[-1][0], value)
                return
            if self.on_tick is not None:
                self.on_tick()

    def peak(self, since: float, until: float = float("inf")) -> int:
        """The largest sample taken in [since, until]; 0 if none was."""
        return max((v for t, v in self.samples if since <= t <= until), default=0)

"""Hand freed heap memory back to the operating system (glibc's malloc_trim), after each bank swap and at
every store poll. (MKL's GEMM buffer pool is turned off before torch loads: `service.threads.SERVING_ENV`.)

An upload passes through several threads (request body, parsing, trial classification), and glibc keeps what
they freed in per-thread arenas. Without a trim the server's resident memory grows by more than the bundles it
holds; with it, RSS tracks the bank. A no-op where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("clipbank.service")

_libc = None
_name = ctypes.util.find_library("c")
if _name:
    try:
        _lib = ctypes.CDLL(_name)
        _libc = _lib if hasattr(_lib, "malloc_trim") else None
    except OSError:  # pragma: no cover - no loadable libc
        _libc = None


def release_free_memory() -> bool:
    """True when memory was returned to the system."""
    if _libc is None:
        return False
    return bool(_libc.malloc_trim(0))

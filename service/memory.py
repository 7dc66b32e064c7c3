"""Keep the server's resident memory tracking its bank: hand freed heap memory back to the operating system
(glibc's malloc_trim) after each bank swap and at every store poll, and keep MKL from pooling GEMM buffers.

An upload passes through several threads (request body, parsing, trial classification), and glibc keeps what
they freed in per-thread arenas. Without a trim the server's resident memory grows by more than the bundles it
holds; with it, RSS tracks the bank. A no-op where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

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


def no_mkl_buffer_pool() -> None:
    """Turn off MKL's memory manager (`MKL_DISABLE_FAST_MM`), unless the operator set the variable.

    It keeps every GEMM buffer it ever allocated, per thread, for reuse. The selectors' GEMMs grow with the bank,
    so each bank size left bigger buffers behind (measured with memray: about 130 KiB per task on the tiny
    backbone, a tenth of a bundle); throughput was the same without it (docs/benchmarks/serve.md). MKL reads the
    variable at its first call, so this must run before any torch computation of the process.
    """
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")

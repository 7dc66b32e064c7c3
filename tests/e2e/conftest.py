"""End-to-end fixtures: a real `clipbank serve` process on 127.0.0.1, used like a client would."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from benchmarks.process import server_process

TOKEN = "e2e-admin-token-0123456789"
# Servers here use the default frozen runtime (ONNX Runtime on CPU); its exports go to a folder of this run's.
ONNX_CACHE = tempfile.mkdtemp(prefix="clipbank-e2e-onnx-")
atexit.register(shutil.rmtree, ONNX_CACHE, ignore_errors=True)  # 25 MB a run were left in the temp folder


@contextmanager
def running_server(store: Path, log: Path, *extra: str):
    """The server on `store`, logging to `log`; yields its URL once ready, stops it with SIGTERM afterwards."""
    env = {"CLIPBANK_ADMIN_TOKEN": TOKEN, "OMP_NUM_THREADS": "1", "CLIPBANK_ONNX_CACHE": ONNX_CACHE}
    with server_process(store, extra, env, log, ready_seconds=120) as (url, _):
        yield url

"""The server's memory settings: MKL's GEMM buffer pool is off, unless the operator chose otherwise, from before
torch loads (MKL reads the variable once, when it loads: set any later, it does nothing)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Records MKL_DISABLE_FAST_MM at the moment torch is first imported, then runs `clipbank serve` with a port
# that its settings refuse (exit 2, after the import).
PROBE = """
import importlib.abc, os, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("MKL_DISABLE_FAST_MM"))
        return None
sys.meta_path.insert(0, Watch())
from clipbank.cli import main
code = main(["serve", "--port", "0"])
print(code, seen)
"""


@pytest.mark.parametrize("given, expected", [(None, "1"), ("operator's", "operator's")])
def test_clipbank_serve_turns_mkl_buffer_pooling_off_before_torch_loads(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "MKL_DISABLE_FAST_MM"}
    if given is not None:
        env["MKL_DISABLE_FAST_MM"] = given
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == f"2 [{expected!r}]", out.stdout + out.stderr

"""The server's native-library settings (`service.threads.SERVING_ENV`): MKL's GEMM buffer pool off and OpenMP's
workers sleeping between parallel regions, unless the operator chose otherwise, from before torch loads (MKL and
OpenMP read their variables once, when they load: set any later, they do nothing)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Records the variable NAME at the moment torch is first imported, then runs `clipbank serve` on a device this
# machine lacks (exit 3, after the import; a setting refused, exit 2, is said before torch loads).
PROBE = """
import importlib.abc, os, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("NAME"))
        return None
sys.meta_path.insert(0, Watch())
from clipbank.cli import main
code = main(["serve", "--device", "cuda:9", "--store", "STORE"])
print(code, seen)
"""


@pytest.mark.parametrize("name", ["MKL_DISABLE_FAST_MM", "OMP_WAIT_POLICY"])
@pytest.mark.parametrize("given", [None, "operator's"])
def test_clipbank_serve_sets_its_library_variables_before_torch_loads(name, given, tmp_path):
    from service.threads import SERVING_ENV

    env = {k: v for k, v in os.environ.items() if k != name}
    if given is not None:
        env[name] = given
    probe = PROBE.replace("NAME", name).replace("STORE", str(tmp_path / "store"))
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    expected = given if given is not None else SERVING_ENV[name]
    assert out.stdout.strip().splitlines()[-1] == f"3 [{expected!r}]", out.stdout + out.stderr

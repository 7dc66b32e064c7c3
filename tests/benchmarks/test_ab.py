"""benchmarks.ab: the pieces that do not need two servers (the side-by-side run itself is a benchmark)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.ab import _hidden, main


def test_a_hidden_module_cannot_be_imported_from_the_other_side(tmp_path):
    where = _hidden(["json"], tmp_path / "hidden")
    env = {"PYTHONPATH": str(where)}
    run = subprocess.run([sys.executable, "-c", "import json"], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "json hidden by benchmarks.ab" in run.stderr


def test_a_folder_that_is_not_a_clipbank_tree_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--against", str(tmp_path)])
    assert e.value.code == 2 and "not a clipbank tree" in capsys.readouterr().err

"""`clipbank demo` on a second run and with settings that cannot work (an outside check's findings)."""

from __future__ import annotations

from clipbank.cli import main
from model_store.bank import empty_bank
from model_store.store import LocalStore
from tests.helpers import edit_bundle, random_bundle
from training.demo import _kept


def test_demo_settings_that_cannot_work_are_refused_before_any_export(tmp_path, capsys):
    """`--steps 0` was refused only after the data was exported and the store made; a file as the workdir said
    `[Errno 20] Not a directory: 'dm-file/data'`."""
    assert main(["demo", "--workdir", str(tmp_path / "w"), "--steps", "0"]) == 2
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    (tmp_path / "afile").write_text("x")
    assert main(["demo", "--workdir", str(tmp_path / "afile")]) == 2
    assert "is a file; give a folder (made if missing)" in capsys.readouterr().err
    # its busy-machine advice names --threads (an outside check found no such flag on demo)
    assert main(["demo", "--workdir", str(tmp_path / "w"), "--threads", "-1"]) == 2
    assert "--threads must be >= 0" in capsys.readouterr().err and not (tmp_path / "w").exists()


def test_a_second_demo_run_says_when_the_stored_task_was_trained_otherwise(tmp_path, capsys, backbone):
    """A rerun with --steps 500 skipped training and printed the 40-step figures, without saying so."""

    def trained_40(m):
        m["training"] = {**(m.get("training") or {}), "steps": 40}

    data = edit_bundle(random_bundle(empty_bank(backbone), "textures", seed=1), manifest=trained_40)
    store = LocalStore(tmp_path / "store")
    store.put(data)
    _kept(store, "textures", 40)
    out = capsys.readouterr().out
    assert "textures: already in" in out and "trained with" not in out
    _kept(store, "textures", 500)
    out = capsys.readouterr().out
    assert "its stored version was trained with 40 steps, not the --steps 500 asked now" in out, out

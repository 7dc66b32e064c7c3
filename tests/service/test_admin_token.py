"""The admin token a server generates when none is set: saved in the store folder, and never a damaged one."""

from __future__ import annotations

import errno
import os

import pytest

from service import admin_token
from service.admin_token import ADMIN_TOKEN_FILE, resolve_admin_token
from service.config import ServeConfig


@pytest.mark.parametrize(
    "saved,why",
    [
        ("", "shorter than 16 characters"),
        ("\n", "shorter than 16 characters"),
        ("Fn5CH\n", "shorter than 16 characters"),
        ("pässwörd äöü 1234567890\n", "not printable ASCII without spaces"),  # an operator's (no client could send it)
        ("two words, sixteen chars and more", "not printable ASCII without spaces"),
    ],
)
def test_an_empty_short_or_unsendable_saved_token_is_replaced(tmp_path, saved, why, caplog):
    """An empty token file locked every admin request out; a 5-character one was accepted as the admin token, and
    one with spaces or accents was accepted though no client could send it (every admin request got 401)."""
    (tmp_path / ADMIN_TOKEN_FILE).write_text(saved, encoding="utf-8")
    token, where = resolve_admin_token(ServeConfig(store=str(tmp_path)))
    assert len(token) >= 16 and "generated and saved" in where
    assert (tmp_path / ADMIN_TOKEN_FILE).read_text().strip() == token
    assert f"{why}" in caplog.text and "replaced" in caplog.text
    assert resolve_admin_token(ServeConfig(store=str(tmp_path)))[0] == token  # the next start reads it
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADMIN_TOKEN_FILE]


def test_a_full_disk_leaves_no_temp_token_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(admin_token.os, "fsync", full)
    token, where = resolve_admin_token(ServeConfig(store=str(tmp_path)))
    assert len(token) >= 16 and "not saved" in where and "No space left" in where
    assert list(tmp_path.iterdir()) == []  # neither the token file nor a temp file
    monkeypatch.setattr(admin_token.os, "fsync", os.fsync)


def test_a_store_path_under_a_file_is_no_traceback(tmp_path):
    """`--store` naming a file: the settings say so, before anything loads (an outside check's server loaded the
    backbone and made a token it could not save first), and the store's own error says it too."""
    from model_store.errors import StoreError
    from model_store.store import open_store

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match=r"store .*a-file is a file, not a folder$"):
        ServeConfig(store=str(tmp_path / "a-file"))
    with pytest.raises(ValueError, match=r"store .*sub: .*a-file is a file, not a folder$"):
        ServeConfig(store=str(tmp_path / "a-file" / "sub"))
    import pathlib

    def not_allowed(self, *a, **k):  # a folder of another user's, mode 700 (root here reads everything)
        raise PermissionError(13, "Permission denied")

    with pytest.MonkeyPatch.context() as patch:  # the settings do not fail on it: the store says what it cannot do
        patch.setattr(pathlib.Path, "exists", not_allowed)
        assert ServeConfig(store="/root/other-users/store").store == "/root/other-users/store"
    (tmp_path / "gone").symlink_to(tmp_path / "nothing")
    with pytest.raises(ValueError, match=r"store .*gone is a symbolic link to .*nothing', which does not exist$"):
        ServeConfig(store=str(tmp_path / "gone"))
    with pytest.raises(StoreError, match=r"store .*a-file is a file, not a folder$"):
        open_store(tmp_path / "a-file")
    with pytest.raises(StoreError, match=r"store .*sub: .*a-file is a file, not a folder$"):
        open_store(tmp_path / "a-file" / "sub")


def test_a_saved_token_others_can_read_is_warned_of(tmp_path, caplog):
    """An outside check's token file copied with mode 644 was used without a word."""
    token, _ = resolve_admin_token(ServeConfig(store=str(tmp_path)))  # saved with mode 600: nothing to say
    assert resolve_admin_token(ServeConfig(store=str(tmp_path)))[0] == token and "chmod" not in caplog.text
    (tmp_path / ADMIN_TOKEN_FILE).chmod(0o644)
    assert resolve_admin_token(ServeConfig(store=str(tmp_path)))[0] == token
    assert "can be read by other users of this machine: `chmod 600" in caplog.text


def test_a_set_token_beside_another_saved_one_is_warned_of(tmp_path, caplog):
    """Servers sharing a store, one started with the token set and one without, had two admin tokens unawares."""
    saved, _ = resolve_admin_token(ServeConfig(store=str(tmp_path)))
    token, where = resolve_admin_token(ServeConfig(store=str(tmp_path), admin_token="s" * 20))
    assert (token, where) == ("s" * 20, "set") and "is not accepted here" in caplog.text
    caplog.clear()
    assert resolve_admin_token(ServeConfig(store=str(tmp_path), admin_token=saved))[0] == saved
    assert "is not accepted" not in caplog.text  # the same token: nothing to say


@pytest.mark.anyio
async def test_a_server_started_with_a_set_token_beside_another_saved_one_warns(tmp_path, backbone, caplog):
    """The warning above was never given by a server: start-up resolved the token only when it was not set."""
    from tests.service.conftest import TOKEN, running_app

    (tmp_path / "store").mkdir()
    (tmp_path / "store" / ADMIN_TOKEN_FILE).write_text("a-saved-token-0123456789\n")
    async with running_app(tmp_path, backbone) as c:
        assert c.app.state.service.admin_token == TOKEN
    assert "is not accepted here" in caplog.text and "--admin-token" not in caplog.text


def test_a_temp_token_file_left_by_a_killed_server_is_swept(tmp_path):
    """A server killed between writing its token's temp file and linking it left a secret file behind for ever:
    the next start deletes such files once a minute old, and leaves a fresh one (another server saving now)."""
    old, fresh = tmp_path / f"{ADMIN_TOKEN_FILE}.0a1b2c3d", tmp_path / f"{ADMIN_TOKEN_FILE}.9f8e7d6c"
    other = tmp_path / f"{ADMIN_TOKEN_FILE}.bak"  # not a name a server writes: the operator's
    for p in (old, fresh, other):
        p.write_text("t" * 32 + "\n")
    os.utime(old, (0, os.path.getmtime(old) - 120))
    token, where = resolve_admin_token(ServeConfig(store=str(tmp_path)))
    assert "generated and saved" in where
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADMIN_TOKEN_FILE, fresh.name, other.name])
    os.utime(fresh, (0, os.path.getmtime(fresh) - 120))  # a server that sets its own token sweeps them too
    assert resolve_admin_token(ServeConfig(store=str(tmp_path), admin_token="s" * 20))[1] == "set"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADMIN_TOKEN_FILE, other.name])


@pytest.mark.anyio
@pytest.mark.parametrize("tty, container", [(True, False), (False, False), (True, True)])
async def test_a_generated_token_is_printed_on_a_terminal_never_into_a_log(
    tmp_path, backbone, capsys, monkeypatch, tty, container
):
    """A security check: the first start printed the token in full into the server's log (journald, docker logs),
    which more people read than its mode-600 file. A container's terminal (`docker run -t`) is a log too."""
    import sys

    from service.app import create_app

    terminal = tty and not container
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
    monkeypatch.setattr(admin_token, "CONTAINER_MARKS", ())  # this suite may itself run in a container
    if container:
        monkeypatch.setenv("container", "docker")
    else:
        monkeypatch.delenv("container", raising=False)
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = ServeConfig(store=str(tmp_path / "store"), frozen_runtime="torch")
    app = create_app(config, backbone=backbone)
    async with app.router.lifespan_context(app):
        token = app.state.service.admin_token
    err = capsys.readouterr().err
    saved = (tmp_path / "store" / ADMIN_TOKEN_FILE).read_text().strip()
    assert token == saved and "admin token generated and saved to" in err
    assert (token in err) == terminal, err
    if not terminal:
        assert "not shown in a log, read it from the file" in err


@pytest.mark.anyio
async def test_a_token_neither_saved_nor_shown_says_how_to_manage_the_server(tmp_path, backbone, capsys, monkeypatch):
    """An SRE's: on a full (or read-only) store the generated token was not saved, and the line pointed at a file
    that did not exist: /tasks was locked with no way in. It now says to set the token."""
    import sys

    from service.app import create_app

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    real_open = admin_token.os.open

    def full(path, *a, **k):
        if ADMIN_TOKEN_FILE in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *a, **k)

    monkeypatch.setattr(admin_token.os, "open", full)
    app = create_app(ServeConfig(store=str(tmp_path / "store"), frozen_runtime="torch"), backbone=backbone)
    async with app.router.lifespan_context(app):
        token = app.state.service.admin_token
    err = capsys.readouterr().err
    assert "generated, not saved" in err and "set CLIPBANK_ADMIN_TOKEN to use /tasks" in err
    assert token not in err and "read it from the file" not in err

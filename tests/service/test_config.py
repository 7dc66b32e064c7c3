"""Server settings: environment variables, flags over variables, and one error naming every bad setting."""

from __future__ import annotations

import pytest

from clipbank.cli import main
from service.config import Limits, ServeConfig


def test_defaults_are_the_offline_embedded_server():
    cfg = ServeConfig.from_env({})
    assert (cfg.backbone, cfg.store, cfg.host, cfg.port) == ("tiny", "./clipbank-store", "127.0.0.1", 8000)
    assert cfg.admin_token is None and cfg.limits == Limits()
    assert cfg.limits.max_upload_bytes == 256 * 1024 * 1024


def test_environment_then_flags():
    env = {"CLIPBANK_PORT": "9000", "CLIPBANK_MAX_WAIT_MS": "1.5", "CLIPBANK_MAX_IMAGES": "8", "CLIPBANK_STORE": "/s"}
    cfg = ServeConfig.from_env(env, port=9100, store=None)
    assert cfg.port == 9100 and cfg.max_wait_ms == 1.5 and cfg.limits.max_images == 8 and cfg.store == "/s"


def test_one_clients_share_of_the_buffered_bodies_is_never_below_one_largest_body():
    mib = 1024 * 1024
    assert ServeConfig.from_env({}).limits.client_buffered_bytes == 512 * mib
    assert ServeConfig.from_env({"CLIPBANK_MAX_CLIENT_BUFFERED_BYTES": "0"}).limits.client_buffered_bytes == 0
    low = ServeConfig.from_env({"CLIPBANK_MAX_CLIENT_BUFFERED_BYTES": "1000"})  # a client may send one bundle
    assert low.limits.client_buffered_bytes == 256 * mib
    with pytest.raises(ValueError, match="max_client_buffered_bytes must be >= 0, got -1"):
        ServeConfig.from_env({"CLIPBANK_MAX_CLIENT_BUFFERED_BYTES": "-1"})


def test_every_bad_setting_is_named_at_once():
    with pytest.raises(ValueError) as e:
        ServeConfig.from_env({"CLIPBANK_MAX_BATCH": "0", "CLIPBANK_MAX_PIXELS": "0", "CLIPBANK_ADMIN_TOKEN": "short"})
    for name in ("max_batch", "max_pixels", "admin_token"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="CLIPBANK_PORT='eighty' is not a valid int"):
        ServeConfig.from_env({"CLIPBANK_PORT": "eighty"})
    # flags win over variables, even over one that does not parse (`CLIPBANK_MAX_BATCH=abc serve --max-batch 64`)
    cfg = ServeConfig.from_env({"CLIPBANK_MAX_BATCH": "abc", "CLIPBANK_MAX_IMAGES": "x"}, max_batch=64, max_images=9)
    assert (cfg.max_batch, cfg.limits.max_images) == (64, 9)


def test_settings_made_in_python_are_checked_for_their_type_by_name():
    """An outside check: `ServeConfig(port="18124")` failed with "'<' not supported between instances of 'int' and
    'str'"; numpy's integers are taken, as the client takes them."""
    import numpy as np

    from service.config import SettingsError

    with pytest.raises(SettingsError, match="port must be an integer, got str '18124'"):
        ServeConfig(port="18124")
    with pytest.raises(SettingsError, match="max_images must be an integer, got str '3'"):
        ServeConfig(limits=Limits(max_images="3"))
    with pytest.raises(SettingsError, match="broadcast must be True or False, got str 'no'"):
        ServeConfig(broadcast="no")
    cfg = ServeConfig(port=np.int64(9001), max_wait_ms=np.float64(2.5))
    assert (type(cfg.port), cfg.port, type(cfg.max_wait_ms)) == (int, 9001, float)
    # a whole float for a count was taken before these checks (`max_request_bytes=64e6`), and still is, as an int
    cfg = ServeConfig(max_batch=64.0, limits=Limits(max_request_bytes=64e6))
    assert (type(cfg.max_batch), type(cfg.limits.max_request_bytes)) == (int, int)
    for bad in (64.5, True):
        with pytest.raises(SettingsError, match="max_batch must be an integer"):
            ServeConfig(max_batch=bad)


def test_a_bad_setting_names_the_variable_or_flag_it_came_from():
    """An outside check: "port must be in 1..65535, got 0" named neither; 1e20 images per batch were taken."""
    with pytest.raises(ValueError) as e:
        ServeConfig.from_env({"CLIPBANK_MAX_BATCH": str(10**20), "CLIPBANK_PORT": "0"}, max_wait_ms=-1.0)
    said = str(e.value)
    assert "max_batch must be in 1..4096, got 100000000000000000000 (from CLIPBANK_MAX_BATCH)" in said
    assert "port must be in 1..65535, got 0 (from CLIPBANK_PORT)" in said
    assert "max_wait_ms must be in 0..10000, got -1.0 (from --max-wait-ms)" in said
    with pytest.raises(ValueError, match=r"max_queue_images must be at most 1000000, got 10000000000 \(from"):
        ServeConfig.from_env({"CLIPBANK_MAX_QUEUE_IMAGES": str(10**10)})
    # two settings at odds: the one given is named, a default is not (the review: it named CLIPBANK_MAX_IMAGES)
    with pytest.raises(ValueError) as e:
        ServeConfig.from_env({"CLIPBANK_MAX_BATCH": "8"})
    assert "max_images (64) must be <= max_batch (8), since a request is never split (from CLIPBANK_MAX_BATCH)" in str(
        e.value
    )
    with pytest.raises(ValueError) as e:
        ServeConfig.from_env({"CLIPBANK_MAX_IMAGES": "128"}, max_batch=100)
    assert "(from CLIPBANK_MAX_IMAGES, --max-batch)" in str(e.value)


def test_a_token_read_from_a_file_with_its_newline_is_taken_as_the_client_takes_it():
    """The client strips a token's surrounding whitespace; the server refused the same value as unsendable."""
    cfg = ServeConfig.from_env({"CLIPBANK_ADMIN_TOKEN": "a" * 20 + "\n", "CLIPBANK_CLASSIFY_TOKEN": " " + "b" * 20})
    assert (cfg.admin_token, cfg.classify_token) == ("a" * 20, "b" * 20)
    with pytest.raises(ValueError, match="admin_token must be printable ASCII"):
        ServeConfig.from_env({"CLIPBANK_ADMIN_TOKEN": "a" * 10 + " " + "a" * 10})  # inside: still refused
    with pytest.raises(ValueError, match="CLIPBANK_CLASSIFY_TOKEN is set but blank"):  # not an open /classify
        ServeConfig.from_env({"CLIPBANK_CLASSIFY_TOKEN": "  \n"})
    for name in ("CLIPBANK_CLASSIFY_TOKEN", "CLIPBANK_ADMIN_TOKEN"):  # a security check: `NAME=` in .env, set empty
        with pytest.raises(ValueError, match=f"{name} is set but blank"):  # left /classify open, without a word
            ServeConfig.from_env({name: ""})


def test_cli_serve_refuses_bad_settings_with_exit_code_2_before_torch_loads(monkeypatch, capsys):
    import subprocess
    import sys

    monkeypatch.setenv("CLIPBANK_MAX_BATCH", "-1")
    assert main(["serve"]) == 2
    assert "max_batch must be in 1..4096" in capsys.readouterr().err
    code = (  # an outside check waited 6-10 s for the message: torch and open_clip were imported first
        "import sys, os; os.environ['CLIPBANK_PORT'] = '0'; from clipbank.cli import main; code = main(['serve']); "
        "print(code, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["2", "False"], out


def test_the_unclaimed_monitors_settings_are_checked_before_start_up(monkeypatch, capsys):
    """Every limit of the monitor's own config, as a setting error (exit 2) before the backbone loads."""
    with pytest.raises(ValueError, match="bin_seconds must be at most 9999"):
        ServeConfig(unclaimed_retention_seconds=600_000, unclaimed_bin_seconds=60)
    with pytest.raises(ValueError, match="unclaimed monitor: thumbnail must be 0"):
        ServeConfig(unclaimed_thumbnails=8)
    monkeypatch.setenv("CLIPBANK_UNCLAIMED_RETENTION_SECONDS", "600000")
    assert main(["serve", "--unclaimed-bin-seconds", "60"]) == 2
    assert "invalid server settings" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("store", "endpoint", "said"),
    [
        ("s3://", None, "an S3 store is s3://bucket or s3://bucket/prefix"),
        ("s3:///prefix", None, "an S3 store is s3://bucket or s3://bucket/prefix"),
        ("s3://bank/p", "127.0.0.1:9000", "CLIPBANK_S3_ENDPOINT_URL must be an http:// or https:// URL"),
        ("s3://bank/p", "http://user:pw@127.0.0.1:9000", "CLIPBANK_S3_ENDPOINT_URL holds credentials"),
    ],
)
def test_s3_store_settings_are_checked_before_start_up(monkeypatch, capsys, store, endpoint, said):
    """An outside check: these failed with exit 3 after the backbone and its ONNX export had loaded (25 s)."""
    monkeypatch.setenv("CLIPBANK_ADMIN_TOKEN", "t" * 32)
    if endpoint:
        monkeypatch.setenv("CLIPBANK_S3_ENDPOINT_URL", endpoint)
    try:
        code = main(["serve", "--store", store])
    except SystemExit as e:  # UsageError
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "invalid server settings" in err and said in err and "pw" not in err, err


def test_frozen_runtime_must_be_known():
    assert ServeConfig().frozen_runtime == "auto"
    assert ServeConfig.from_env({"CLIPBANK_FROZEN_RUNTIME": "onnx"}).frozen_runtime == "onnx"
    with pytest.raises(ValueError, match="frozen_runtime must be one of auto, torch, onnx"):
        ServeConfig(frozen_runtime="tensorrt")


def test_a_device_this_machine_lacks_fails_before_the_server_listens(tmp_path, monkeypatch, caplog):
    """`serve --device cuda` on a machine without one logged "Application startup complete" and listened, then
    failed in the background; `mps` passed the setting's check and failed the same way."""
    import torch

    import service.server as server

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(server.uvicorn, "Server", lambda *a, **k: pytest.fail("the server was started"))
    assert server.serve(ServeConfig(store=str(tmp_path), device="cuda:1")) == 3
    assert "no usable CUDA device" in caplog.text
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got 'mps'"):
        ServeConfig(device="mps")


def test_a_port_in_use_fails_before_the_app_is_made_naming_the_address(tmp_path, monkeypatch, caplog):
    """An outside check: a port in use still loaded the backbone and the bank (a download, for real weights), and
    the log ended on "bank generation 4: 1 tasks", after uvicorn's error; an unknown host was not named."""
    import socket

    import service.server as server

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    monkeypatch.setattr(server, "create_app", lambda *a, **k: pytest.fail("the app was made"))
    try:
        assert server.serve(ServeConfig(store=str(tmp_path / "s"), port=port, device="cpu")) == 3
    finally:
        busy.close()
    assert f"start-up failed: cannot listen on 127.0.0.1 port {port}: Address already in use" in caplog.text
    assert not (tmp_path / "s").exists()  # nor a store and its token


@pytest.mark.parametrize(
    "host,token,warned",
    [("0.0.0.0", None, True), ("127.0.0.1", None, False), ("0.0.0.0", "c" * 20, False), ("localhost", None, False)],
)
def test_a_server_open_beyond_this_machine_without_a_classify_token_says_so(
    tmp_path, monkeypatch, caplog, host, token, warned
):
    """An outside check's `--host 0.0.0.0` with /classify and /metrics open was taken without a word."""
    import service.server as server

    monkeypatch.setattr(server, "check_listening", lambda *a: None)
    monkeypatch.setattr(server, "create_app", lambda *a, **k: pytest.fail("stop here"))
    cfg = ServeConfig(store=str(tmp_path / "s"), host=host, device="cpu", classify_token=token)
    with caplog.at_level("INFO", logger="clipbank.service"), pytest.raises(pytest.fail.Exception):
        server.serve(cfg)
    assert ("beyond this machine, with /classify and /metrics open" in caplog.text) == warned, caplog.text


def test_a_start_up_failure_is_said_at_log_level_critical_too(tmp_path, monkeypatch, caplog, capsys):
    """`--log-level critical`: a backbone that could not load ended in exit 3 with no reason anywhere."""
    import logging
    import socket

    import uvicorn

    import service.server as server

    def failing_app(config, on_fatal):
        on_fatal("start-up failed: backbone_error: checkpoint file /x does not exist")
        return lambda scope, receive, send: None

    monkeypatch.setattr(server, "create_app", failing_app)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    monkeypatch.setattr(logging.getLogger("clipbank.service"), "level", logging.CRITICAL)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]  # a free port
    probe.close()
    assert server.serve(ServeConfig(store=str(tmp_path), port=port, device="cpu", log_level="critical")) == 3
    assert "clipbank serve: start-up failed: backbone_error: checkpoint file /x" in capsys.readouterr().err


def test_a_token_is_read_from_the_file_its_file_variable_names(tmp_path):
    """As Docker and Kubernetes mount secrets: the token is then in no environment `docker inspect` shows."""
    from service.config import unknown_variables

    secret = tmp_path / "admin_token"
    secret.write_text("s" * 24 + "\n")
    cfg = ServeConfig.from_env({"CLIPBANK_ADMIN_TOKEN_FILE": str(secret)})
    assert cfg.admin_token == "s" * 24 and unknown_variables({"CLIPBANK_ADMIN_TOKEN_FILE": "x"}) == []
    (tmp_path / "big").write_bytes(b"t" * 5000)
    (tmp_path / "empty").write_text("\n")
    for env, problem in [
        ({"CLIPBANK_ADMIN_TOKEN_FILE": str(secret), "CLIPBANK_ADMIN_TOKEN": "a" * 20}, "are both set: set one"),
        ({"CLIPBANK_CLASSIFY_TOKEN_FILE": str(tmp_path / "none")}, "CLIPBANK_CLASSIFY_TOKEN_FILE=.* cannot be read"),
        ({"CLIPBANK_ADMIN_TOKEN_FILE": str(tmp_path)}, "cannot be read: .*Is a directory"),
        ({"CLIPBANK_ADMIN_TOKEN_FILE": str(tmp_path / "big")}, "over 4096 bytes"),
        ({"CLIPBANK_ADMIN_TOKEN_FILE": str(tmp_path / "empty")}, "ADMIN_TOKEN_FILE=.* cannot be read: it is empty"),
    ]:
        with pytest.raises(ValueError, match=problem):
            ServeConfig.from_env(env)


def test_a_variable_no_setting_reads_is_named_with_the_nearest_one():
    """A misspelt variable was ignored without a word; `clipbank serve` now warns, naming the setting meant."""
    from service.config import unknown_variables

    env = {"CLIPBANK_MAX_IMAGE": "8", "CLIPBANK_MAX_IMAGES": "8", "CLIPBANK_URL": "x", "CLIPBANK_UNUSED_THING": "1"}
    assert unknown_variables({**env, "PATH": "/bin"}) == [
        "CLIPBANK_MAX_IMAGE (did you mean CLIPBANK_MAX_IMAGES?)",
        "CLIPBANK_UNUSED_THING",
    ]
    assert unknown_variables({"CLIPBANK_S3_ENDPOINT_URL": "x", "CLIPBANK_ONNX_CACHE": "y"}) == []


def test_a_store_given_as_a_variable_with_a_tilde_is_under_home(tmp_path, monkeypatch):
    """`CLIPBANK_STORE='~/x'` (no shell expands a variable's `~`) made a folder named "~" in the working directory,
    and the start-up line pointed to a token file there."""
    from model_store.store import open_store

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPBANK_STORE", "~/clipbank-store")
    assert ServeConfig.from_env().store == str(tmp_path / "home" / "clipbank-store")
    assert open_store("~/other").location == str(tmp_path / "home" / "other")
    assert not (tmp_path / "~").exists()


def test_sighup_stops_the_server_gracefully_unless_nohup_ignores_it():
    """SIGHUP (a closed terminal) killed the server at once; taken as SIGTERM now, but not under `nohup`, which
    ignores it so the server outlives the terminal (the review)."""
    import signal

    import uvicorn

    from service.server import _Server

    server = _Server(uvicorn.Config(app=lambda *a: None))
    before = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with server.capture_signals():
            signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)  # as if it came
            assert server.should_exit and not server.force_exit
            server._captured_signals.clear()  # not raised again at the end: it would stop the test run
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # put back
        server.should_exit = False
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with server.capture_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_word_settings_and_the_tiny_backbone_take_any_case(capsys):
    """An outside check: `CLIPBANK_LOG_LEVEL=INFO` and `--log-level INFO` were refused, `--backbone Tiny` loaded
    torch and open_clip, then failed as an open_clip model name."""
    import argparse

    from clipbank.flags import add_flags

    env = {"CLIPBANK_LOG_LEVEL": "INFO", "CLIPBANK_DEVICE": "CPU", "CLIPBANK_FROZEN_RUNTIME": "ONNX"}
    cfg = ServeConfig.from_env(env, backbone="Tiny")
    assert (cfg.log_level, cfg.device, cfg.frozen_runtime) == ("info", "cpu", "onnx")
    from model_store.backbone_ref import parse_backbone_ref

    assert parse_backbone_ref(cfg.backbone).arch == "clipbank-tiny"
    parser = argparse.ArgumentParser()
    add_flags(parser, ServeConfig)
    assert parser.parse_args(["--log-level", "DEBUG"]).log_level == "debug"
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-level", "LOUD"])
    assert "invalid choice: 'loud'" in capsys.readouterr().err


def test_a_malformed_backbone_reference_is_refused_with_the_settings(capsys):
    """Said with the settings, exit 2, before torch loads (it was said after 12 s, as a start-up failure)."""
    assert main(["serve", "--backbone", "ViT-B-16"]) == 2
    said = capsys.readouterr().err
    assert "'ViT-B-16' needs a weights part (e.g. 'ViT-B-16:openai' or 'ViT-B-16:file:" in said
    assert said.rstrip().endswith("(from --backbone)")
    with pytest.raises(ValueError, match="needs an open_clip model name before ':'"):
        ServeConfig.from_env({"CLIPBANK_BACKBONE": ":openai"})
    for fine in ("ViT-B-16:openai", "ViT-B-32:none", "file:/w/model.safetensors", "local-dir:/m", "RN50:file:/x.pt"):
        assert ServeConfig(backbone=fine).backbone == fine  # whether it loads is the start-up's to say


def test_the_ray_engine_says_too_when_classify_is_open_beyond_this_machine(monkeypatch, caplog):
    """The uvicorn engine said it; `--engine ray --host 0.0.0.0` did not."""
    import signal

    ray = pytest.importorskip("ray")
    from ray import serve

    from service import ray_engine

    monkeypatch.setattr(ray, "init", lambda *a, **k: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(serve, "start", lambda **k: None)
    monkeypatch.setattr(serve, "run", lambda *a, **k: None)
    monkeypatch.setattr(ray_engine, "application", lambda *a, **k: None)
    monkeypatch.setattr(ray_engine, "claim", lambda: "this-driver")  # Ray's KV store: no cluster in this test

    def stop_here(config):
        raise RuntimeError("stop here")

    monkeypatch.setattr(ray_engine, "say_what_serves", stop_here)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with caplog.at_level("INFO", logger="clipbank.service"), pytest.raises(RuntimeError, match="stop here"):
            ray_engine.run(ServeConfig(host="0.0.0.0", admin_token="a" * 20, engine="ray"))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert "beyond this machine, with /classify and /metrics open" in caplog.text

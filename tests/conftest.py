"""Shared fixtures: the embedded tiny backbone and small synthetic bundles."""

from __future__ import annotations

import pytest
import torch

from model_store.backbone import load_backbone

THREADS = 2
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Torch is put back on THREADS compute threads after each test: code run in process (a benchmark's entry
    point, an app's lifespan) sets its own and keeps it, and every later test ran on one thread (the trained
    fixture took 210 s in the suite, 129 s alone)."""
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def backbone():
    return load_backbone("tiny", device="cpu")


TRAIN_STEPS = 240


@pytest.fixture(scope="session")
def trained(tmp_path_factory, backbone):
    """Two offline domains trained one after the other into one store: textures, then glyphs on top."""
    from model_store.loader import BankLoader
    from model_store.reference import find_reference
    from model_store.store import LocalStore
    from training.data import load_domain
    from training.trainer import TrainConfig, train_task

    store = LocalStore(tmp_path_factory.mktemp("trained") / "store")
    reports, banks = {}, {}
    for name in ("textures", "glyphs"):
        bank = BankLoader(store, backbone).load()
        result = train_task(
            bank,
            load_domain(name, "train"),
            TrainConfig(task=name, steps=TRAIN_STEPS),
            load_domain(name, "val"),
            progress=False,
            reference=find_reference(backbone),
        )
        store.put(result.bundle)
        reports[name] = result.report
        banks[name] = BankLoader(store, backbone).load()
    return store, reports, banks


@pytest.fixture(scope="session")
def bundles(trained):
    """Bytes of the session's trained bundles: textures v1, then glyphs v1 (which uses textures' experts)."""
    store, _, _ = trained
    return {task: store.read(bid) for task, bid in store.active().items()}


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server on 127.0.0.1 (moto's server mode, with conditional writes), shared by the session."""
    import logging

    pytest.importorskip("boto3")
    server_mode = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = server_mode.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """Credentials and endpoint as a user sets them; a fresh bucket per test (its name is returned)."""
    import time

    import boto3

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "CLIPBANK_S3_ENDPOINT_URL": s3_server,
        "CLIPBANK_S3_CACHE_DIR": str(tmp_path / "s3-cache"),
    }.items():
        monkeypatch.setenv(name, value)
    bucket = f"clipbank-{time.monotonic_ns()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return bucket

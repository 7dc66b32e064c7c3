"""The server's memory settings: MKL's GEMM buffer pool is off unless the operator chose otherwise."""

from __future__ import annotations

import os

from service.app import create_app
from service.config import ServeConfig


def test_the_app_turns_mkl_buffer_pooling_off_unless_the_operator_set_it(monkeypatch, backbone, tmp_path):
    config = ServeConfig(admin_token="t" * 32, store=str(tmp_path / "store"))
    monkeypatch.delenv("MKL_DISABLE_FAST_MM", raising=False)
    create_app(config, backbone=backbone)
    assert os.environ["MKL_DISABLE_FAST_MM"] == "1"
    monkeypatch.setenv("MKL_DISABLE_FAST_MM", "operator's")
    create_app(config, backbone=backbone)
    assert os.environ["MKL_DISABLE_FAST_MM"] == "operator's"

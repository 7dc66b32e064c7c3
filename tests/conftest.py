"""Shared fixtures: the embedded tiny backbone and small synthetic bundles."""

from __future__ import annotations

import pytest
import torch

from model_store.backbone import load_backbone

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def backbone():
    return load_backbone("tiny", device="cpu")


TRAIN_STEPS = 300


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

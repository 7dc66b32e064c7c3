"""Shared fixtures: the embedded tiny backbone and small synthetic bundles."""

from __future__ import annotations

import pytest
import torch

from model_store.backbone import load_backbone

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def backbone():
    return load_backbone("tiny", device="cpu")

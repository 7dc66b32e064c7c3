"""Offline domains: deterministic splits and ImageFolder export."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import load_image_folder
from training.domains import DOMAINS, export_domain, get_domain


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_splits_are_deterministic_and_distinct(name):
    d = get_domain(name)
    a_imgs, a_labels = d.split("val")
    b_imgs, b_labels = d.split("val")
    assert a_labels == b_labels
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a_imgs[:20], b_imgs[:20], strict=True))
    test_imgs, _ = d.split("test")
    assert not np.array_equal(np.asarray(a_imgs[0]), np.asarray(test_imgs[0]))
    assert set(a_labels) == set(range(len(d.classes)))


def test_export_round_trip(tmp_path):
    counts = export_domain("textures", tmp_path)
    assert set(counts) == {"train", "val", "test"}
    data = load_image_folder(tmp_path / "val")
    assert set(data.classes) == set(get_domain("textures").classes)
    assert len(data) == counts["val"]


def test_unknown_domain():
    with pytest.raises(ValueError, match="known: arrows, clocks, clutter"):
        get_domain("mnist")

"""benchmarks.peer_ab: its summary (the side-by-side run itself is a benchmark)."""

from __future__ import annotations

import argparse

from benchmarks.peer_ab import summary


def test_the_ratio_is_of_the_medians_and_each_round_pairs_the_two_sides():
    rows = []
    for r, (mine, theirs) in enumerate(((20.0, 10.0), (30.0, 20.0), (12.0, 12.0))):
        rows.append({"server": "clipbank", "images_per_s": mine, "p99_ms": 100.0 + r, "round": r})
        rows.append({"server": "litserve", "images_per_s": theirs, "p99_ms": 200.0, "round": r})
    out = summary(rows, argparse.Namespace(rounds=3, out=None))["ratios"]
    assert out["zero_shot_vs_litserve"] == 1.667  # 20 / 12: medians, not the mean of the rounds' ratios
    assert out["per_round"] == [2.0, 1.5, 1.0] and out["p99_zero_shot_vs_litserve"] == 0.505

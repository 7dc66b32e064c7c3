"""benchmarks.peer_ab: its summary (the side-by-side run itself is a benchmark)."""

from __future__ import annotations

import argparse

from benchmarks.peer_ab import summary


def test_the_ratio_is_of_the_medians_and_each_round_pairs_the_two_sides():
    rows = []
    for r, (mine, theirs) in enumerate(((20.0, 10.0), (30.0, 20.0), (12.0, 12.0))):
        rows.append({"server": "clipbank", "images_per_s": mine, "p99_ms": 100.0 + r, "round": r})
        rows.append({"server": "litserve", "images_per_s": theirs, "p99_ms": 200.0, "round": r})
    out = summary(rows, argparse.Namespace(rounds=3, out=None), {"onnx": 25.0, "torch": 16.0})["ratios"]
    assert out["zero_shot_vs_litserve"] == 1.667  # 20 / 12: medians, not the mean of the rounds' ratios
    assert out["per_round"] == [2.0, 1.5, 1.0] and out["p99_zero_shot_vs_litserve"] == 0.505
    assert out["served_vs_model_only"] == {"clipbank": 0.8, "litserve": 0.75}  # 20 / 25 and 12 / 16
    assert out["ceiling_zero_shot_vs_litserve"] == 2.083  # 25 / 12: no serving work at all on clipbank's side


def test_model_only_measures_both_passes_of_the_tiny_backbone():
    from benchmarks.peer_ab import model_only

    out = model_only("tiny", batch=2, seconds=0.05, rounds=1)
    assert set(out) == {"onnx", "torch"} and all(v > 0 for v in out.values())

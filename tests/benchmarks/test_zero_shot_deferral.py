import math

import pytest
import torch

from benchmarks.zero_shot_deferral import deferral_threshold


def test_threshold_is_the_lowest_confidence_where_zero_shot_is_precise_enough():
    confidence = torch.tensor([0.2, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    correct = torch.tensor([False, False, False, True, True, True, True, True])
    assert deferral_threshold(confidence, correct, precision=1.0, min_count=2) == pytest.approx(0.6)
    assert deferral_threshold(confidence, correct, precision=0.8, min_count=2) == pytest.approx(0.5)  # 5 of 6


def test_no_threshold_when_too_few_images_or_never_precise():
    confidence = torch.tensor([0.5, 0.6, 0.9])
    assert deferral_threshold(confidence, torch.tensor([True, True, True]), 1.0, min_count=4) == math.inf
    assert deferral_threshold(confidence, torch.tensor([False, False, False]), 0.5, min_count=1) == math.inf

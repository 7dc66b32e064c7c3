"""What training says of a task's validation: accuracy per class and balanced, and warnings when the plain figure
hides classes (an outside check's digits: 86% reported, 44% on a balanced held-out set)."""

from __future__ import annotations

import logging

from PIL import Image

from training.data import list_image_folder
from training.validation import validation_figures


def test_an_unbalanced_validation_is_reported_per_class_and_warned_about():
    classes = ("zero", "one", "two", "three", "four")
    figures = validation_figures(classes, [22, 10, 3, 0, 0], [24, 12, 6, 2, 0])  # four: no validation image
    assert round(figures["val_accuracy"], 4) == round(35 / 44, 4)
    assert figures["val_accuracy_per_class"] == {
        "zero": 22 / 24,
        "one": 10 / 12,
        "two": 0.5,
        "three": 0.0,
        "four": None,
    }
    assert figures["val_balanced_accuracy"] == (22 / 24 + 10 / 12 + 0.5 + 0.0) / 4
    first, second = figures["val_warnings"]
    assert "mostly that of the largest classes" in first and "(lowest: three 0%, two 50%" in first
    assert "['four'] have no validation image" in second


def test_a_balanced_validation_says_nothing_more():
    figures = validation_figures(("a", "b"), [9, 8], [10, 10])
    assert figures["val_warnings"] == [] and abs(figures["val_balanced_accuracy"] - 0.85) < 1e-9


def test_a_class_far_smaller_than_the_largest_is_warned_about_before_training(tmp_path, caplog):
    for name, n in (("big", 30), ("mid", 10), ("small", 4), ("one", 1)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.new("RGB", (8, 8), "red").save(tmp_path / name / f"{i}.png")
    with caplog.at_level(logging.WARNING):
        list_image_folder(tmp_path)  # a validation or test folder: nothing to say of its balance
        assert "under a fifth" not in caplog.text
        list_image_folder(tmp_path, training=True)
    assert "class(es) ['small (4)'] have under a fifth of the largest class's 30 images" in caplog.text
    assert "class(es) ['one'] have one image each" in caplog.text


def test_low_validation_accuracy_says_what_to_try():
    """An outside check's runs ended at zero-shot's accuracy (33% against 33%) or at 57%, and nothing said so or
    what to try: the figures were in the JSON alone."""
    from training.validation import learning_warnings

    (same,) = learning_warnings(0.333, 0.333, steps=2, images=60, classes=3)
    assert "hardly above zero-shot CLIP's 33.3%" in same and "--steps (now 2)" in same and "20 per class" in same
    (low,) = learning_warnings(0.12, 0.575, steps=120, images=480, classes=8)
    assert low.startswith("validation accuracy 57.5% is low") and "--steps (now 120)" in low
    assert learning_warnings(0.12, 0.867, steps=500, images=360, classes=6) == []
    assert learning_warnings(None, None, steps=500, images=360, classes=6) == []
    (worse,) = learning_warnings(0.6, 0.4, steps=500, images=360, classes=6)
    assert "below zero-shot CLIP's 60.0%" in worse  # not "hardly above"
    assert learning_warnings(0.97, 0.99, steps=500, images=360, classes=6) == []  # nothing left to learn

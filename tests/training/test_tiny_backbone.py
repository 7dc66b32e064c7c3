"""The committed tiny CLIP is a real CLIP: zero-shot colour and shape on held-out generated images."""

from __future__ import annotations

import open_clip
import torch

from training.domains import COLORS, SHAPES, ShapeScene
from training.pretrain_tiny import caption, match_matrix, zero_shot_probe


def test_zero_shot_colour_and_shape_at_least_80_percent(backbone):
    cfg = open_clip.get_model_preprocess_cfg(backbone.model)
    mean, std = (torch.tensor(cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    acc = zero_shot_probe(backbone.model, backbone.tokenizer, mean, std, per_class=30)
    assert len(COLORS) >= 8 and len(SHAPES) >= 6
    assert acc["color"] >= 0.8, acc
    assert acc["shape"] >= 0.8, acc
    assert not backbone.model.training  # the probe must leave a frozen model in eval mode


def test_caption_matching_is_by_mentioned_attributes():
    red_star = ShapeScene(color=0, shape=3, size=0, background=1)
    red_circle = ShapeScene(color=0, shape=0, size=1, background=2)
    assert caption(red_star, 0) == "a red star."
    # template 8 mentions only the colour: the red circle's caption ("a photo of a red shape.") fits both images
    m = match_matrix([red_star, red_circle], [0, 8])
    assert m.tolist() == [[1.0, 1.0], [0.0, 1.0]]


def test_reading_scenes_extend_the_vocabulary_without_changing_the_shape_stream():
    import numpy as np

    from training.domains import random_scene
    from training.pretrain_tiny import OBJECTS, random_object_scene, render_object

    letter_c = ShapeScene(color=0, shape=len(SHAPES) + 2, size=1, background=1)
    assert caption(letter_c, 0) == "a red letter C." and OBJECTS[len(SHAPES) + 26] == "digit 0"
    assert np.asarray(render_object(letter_c, np.random.default_rng(0))).std() > 10  # something is drawn
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert [random_object_scene(a, 0.5) for _ in range(50)] == [random_scene(b, 0.5) for _ in range(50)]
    drawn = [random_object_scene(a, 0.5, characters=0.4).shape >= len(SHAPES) for _ in range(400)]
    assert 0.3 < sum(drawn) / 400 < 0.5


def test_pretrained_weights_written_elsewhere_load_as_a_file_backbone(tmp_path, caplog):
    """`pretrain-tiny --out FILE` puts the tiny config beside the weights, so `file:FILE` loads them; another
    model's config already there is left alone, and said."""
    import logging

    from model_store.backbone import load_backbone
    from model_store.backbone_ref import TINY_DIR
    from training.config import PretrainConfig
    from training.pretrain_tiny import pretrain_tiny

    cfg = PretrainConfig(steps=1, batch_size=4, eval_per_class=1)
    out = tmp_path / "mine" / "w.safetensors"
    out.parent.mkdir()
    with caplog.at_level(logging.INFO, "training.pretrain_tiny"):
        pretrain_tiny(cfg, out)
    assert (out.parent / "open_clip_config.json").read_bytes() == (TINY_DIR / "open_clip_config.json").read_bytes()
    assert f"--backbone file:{out}" in caplog.text
    bb = load_backbone(f"file:{out}", "cpu")
    assert (bb.ref.arch, bb.ref.pretrained) == ("mine", "file:w.safetensors")  # names, never paths

    other = tmp_path / "other"
    other.mkdir()
    (other / "open_clip_config.json").write_text('{"model_cfg": {}}')
    caplog.clear()
    pretrain_tiny(cfg, other / "w.safetensors")
    assert (other / "open_clip_config.json").read_text() == '{"model_cfg": {}}'
    assert "another model's config" in caplog.text

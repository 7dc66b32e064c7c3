"""Mixed precision (the `autocast` setting): its parity with float32 where a test can run it, CPU bf16."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model_store.errors import BackboneError
from model_store.inference import AUTO, ZERO_SHOT, ClassifyItem, plan_batch
from training.data import load_domain


def _plan(bank, images, classes, task=AUTO):
    x = torch.stack([bank.backbone.preprocess(im) for im in images])
    return plan_batch(bank, [ClassifyItem(x, tuple(classes), task=task, top_k=1)])


@pytest.mark.parametrize("task", [AUTO, ZERO_SHOT])
def test_bf16_autocast_answers_like_float32(trained, task):
    _, _, banks = trained
    bank = banks["glyphs"]  # two trained tasks
    mixed = dataclasses.replace(bank, backbone=bank.backbone.with_autocast("bf16"))
    for domain in ("textures", "glyphs", "shapes"):  # two tasks' images and outside ones
        data = load_domain(domain, "test").subset(range(24))
        full, half = _plan(bank, data.images, data.classes, task), _plan(mixed, data.images, data.classes, task)
        assert not torch.equal(full.feats, half.feats)  # bf16 really ran
        assert float(torch.nn.functional.cosine_similarity(full.feats, half.feats).min()) >= 0.98, domain
        assert (full.tasks == half.tasks).float().mean() >= 0.9, domain  # the same routes, nearly always
        top = [[r.labels[0][0] for r in p.finish(0)] for p in (full, half)]
        assert sum(a == b for a, b in zip(*top, strict=True)) >= 0.9 * len(data), domain
        assert full.feats.dtype == half.feats.dtype == torch.float32  # what leaves the passes stays float32


def test_autocast_setting_is_checked(backbone):
    from service.config import ServeConfig

    with pytest.raises(BackboneError, match="autocast must be one of off, fp16, bf16"):
        backbone.with_autocast("int4")
    with pytest.raises(ValueError, match="autocast must be one of off, fp16, bf16, got 'fp8'"):
        ServeConfig(autocast="fp8")
    assert backbone.autocast == "off" and backbone.with_autocast("bf16").model is backbone.model

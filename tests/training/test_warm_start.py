"""ATLAS-style stage 1: the router may only pick existing experts, so the new ones get no gradient."""

from __future__ import annotations

import torch

from model_store.bank import build_bank, empty_bank
from model_store.bundle import read_bundle
from model_store.moe_clip import encode_image
from tests.helpers import random_bundle
from training.trainer import TrainConfig, _TaskParams


def _grads(backbone, stage1: bool) -> tuple[float, float]:
    bank = build_bank(backbone, [read_bundle(random_bundle(empty_bank(backbone), "old", seed=4))])
    params = _TaskParams(bank, TrainConfig(task="new", warm_start_steps=1), torch.Generator().manual_seed(0))
    x = torch.randn(4, 3, backbone.image_size, backbone.image_size)
    encode_image(backbone.model, x, params.routing(bank, 4, True, stage1=stage1)).sum().backward()
    new_grad = sum(float(p.grad.abs().sum()) for p in params.expert_params if p.grad is not None)
    router_grad = float(params.router["visual_0"].grad.abs().sum())
    return new_grad, router_grad


def test_stage1_trains_only_the_router(backbone):
    new_grad, router_grad = _grads(backbone, stage1=True)
    assert new_grad == 0.0 and router_grad > 0


def test_stage2_trains_the_new_experts(backbone):
    new_grad, _ = _grads(backbone, stage1=False)
    assert new_grad > 0

"""FLOP counts per pass, checked against the count done by hand, and the GEMM rate."""

from __future__ import annotations

from benchmarks.profile import gemm_rate, pass_flops
from benchmarks.synthetic import synthetic_bundle
from model_store.bank import build_bank, empty_bank
from model_store.bundle import read_bundle


def test_adapted_pass_costs_exactly_the_experts_and_router_on_top_of_the_frozen_pass(backbone):
    bank = build_bank(backbone, [read_bundle(synthetic_bundle(empty_bank(backbone), "t", seed=0))])
    f = pass_flops(bank)
    k, rank = bank.config.top_k, 64
    model = backbone.model
    grid = model.visual.grid_size
    tokens = {"visual": grid[0] * grid[1] + 1, "text": model.context_length}
    extra = {}
    for tower, spec in backbone.towers.items():
        n_experts = 2  # a first task: its own two new experts per block
        per_block = k * 2 * (2 * tokens[tower] * spec.width * rank) + 2 * spec.width * n_experts
        extra[tower] = spec.layers * per_block
    assert f["image_adapted"] - f["image_frozen"] == extra["visual"]
    assert f["text_adapted_per_prompt"] - f["text_frozen_per_prompt"] == extra["text"]
    # the frozen image pass is at least the blocks' weight matrices applied to every token
    matrices = sum(p.numel() for p in model.visual.transformer.parameters() if p.ndim == 2)
    assert f["image_frozen"] >= 2 * tokens["visual"] * matrices
    d, h = backbone.embed_dim, 32
    assert f["selector_per_task"] == 2 * (2 * d * h)  # encoder and decoder of the autoencoder


def test_gemm_rate_is_positive_and_finite():
    rate = gemm_rate(n=256, seconds=0.2)
    assert 1e6 < rate < 1e15

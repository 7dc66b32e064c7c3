"""Experts in the top K blocks only (MoEConfig.expert_blocks): bundles record K, a bank refuses to mix Ks, and a
routed image's adapted pass starting from the frozen pass's tokens gives the adapted pass's own answer."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.synthetic import synthetic_bundle
from model_store.bank import build_bank, empty_bank
from model_store.bundle import read_bundle
from model_store.errors import BundleInvalid
from model_store.inference import ClassifyItem, ImagePasses, plan_batch
from model_store.manifest import manifest_problems
from model_store.moe_clip import encode_image
from training.data import load_domain
from training.expert_blocks import with_expert_blocks
from training.trainer import TrainConfig, train_task


def bank_of(backbone, k: int, tasks=("a", "b")):
    bank, parsed = with_expert_blocks(empty_bank(backbone), k), []
    for i, name in enumerate(tasks):
        parsed.append(read_bundle(synthetic_bundle(bank, name, seed=i)))
        bank = build_bank(backbone, parsed, (), i + 1, bank)
    return bank, parsed


def images(backbone, n=6):
    size = backbone.image_size
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def test_a_bundle_records_k_and_has_no_experts_below_it(backbone):
    bank, (a, _) = bank_of(backbone, 2)
    layers = backbone.towers["visual"].layers
    assert a.manifest.moe.expert_blocks == 2 and bank.config.expert_blocks == 2
    assert bank.prefix_block == layers - 2
    for tower in ("visual", "text"):
        counts = [len(ids) for ids in a.manifest.routing.blocks[tower]]
        assert counts[: layers - 2] == [0] * (layers - 2) and all(c == 2 for c in counts[layers - 2 :]), counts
        assert [len(e) for e in bank.experts[tower]] == [0, 0, 4, 4]  # two tasks, two new experts each


def test_the_adapted_pass_from_the_frozen_tokens_equals_the_whole_adapted_pass(backbone):
    bank, _ = bank_of(backbone, 2)
    x = images(backbone)
    items = [ClassifyItem(x[:3], ("cat", "dog"), task="a"), ClassifyItem(x[3:], ("cat", "dog"), task="b")]
    passes = ImagePasses(bank, items)
    assert passes.prefix == 2
    plan = plan_batch(bank, items)
    whole = encode_image(backbone.model, x, bank.routing(torch.tensor([0, 0, 0, 1, 1, 1])))
    torch.testing.assert_close(plan.feats, whole, rtol=0, atol=1e-5)
    frozen = encode_image(backbone.model, x)
    assert (plan.feats - frozen).abs().max() > 1e-3  # the experts did change the answer
    torch.testing.assert_close(passes_frozen(bank, items), frozen, rtol=0, atol=1e-5)


def passes_frozen(bank, items):
    p = ImagePasses(bank, items)
    while not p.step(2):  # in slices, as the server steps a large batch
        pass
    return p.frozen


def test_every_block_k_has_no_prefix_and_the_old_manifest_layout(backbone):
    bank, (a, _) = bank_of(backbone, 0)
    assert bank.prefix_block == 0 and "expert_blocks" not in a.manifest.to_json()["moe"]
    assert with_expert_blocks(empty_bank(backbone), 4).config.expert_blocks == 0  # K = L is every block


def test_a_bank_refuses_a_bundle_with_another_k(backbone):
    bank2, parsed = bank_of(backbone, 2, ("a",))
    other = read_bundle(synthetic_bundle(with_expert_blocks(empty_bank(backbone), 0), "b", seed=5))
    with pytest.raises(BundleInvalid, match="every block.*top 2 blocks"):
        build_bank(backbone, [*parsed, other], (), 2, bank2)
    with pytest.raises(ValueError, match="cannot mix"):
        with_expert_blocks(bank2, 1)
    assert with_expert_blocks(bank2, None) is bank2


def test_a_manifest_with_experts_below_its_k_is_invalid(backbone):
    _, (a, _) = bank_of(backbone, 2)
    manifest = json.loads(json.dumps(a.manifest.to_json()))
    manifest["moe"]["expert_blocks"] = 1
    assert any("below the top 1" in p for p in manifest_problems(manifest))
    manifest["moe"]["expert_blocks"] = -1
    assert any("expert_blocks" in p for p in manifest_problems(manifest))


def test_training_with_k_puts_experts_in_the_top_blocks_only(backbone):
    data = load_domain("textures", "train").subset(range(48))
    result = train_task(
        empty_bank(backbone), data, TrainConfig(task="t", steps=3, batch_size=16, expert_blocks=1), progress=False
    )
    b = read_bundle(result.bundle)
    assert b.manifest.moe.expert_blocks == 1 and result.report["experts_added"] == 2 * 2  # 2 per tower, 1 block
    assert {p.block for p in b.experts.values()} == {backbone.towers["visual"].layers - 1}

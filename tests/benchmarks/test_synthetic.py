"""Synthetic bundles for serving benchmarks: a trained bundle's shapes, no claims, real adapted compute."""

from __future__ import annotations

import torch

from benchmarks.synthetic import synthetic_bundle
from model_store.bank import build_bank, empty_bank
from model_store.bundle import expected_tensor_bytes, read_bundle, tensor_bytes
from model_store.inference import ClassifyItem, classify_batch


def test_synthetic_bundles_have_trained_shapes_claim_nothing_and_change_the_pinned_pass(backbone):
    bank, parsed = empty_bank(backbone), []
    for k in range(2):
        parsed.append(read_bundle(synthetic_bundle(bank, f"syn-{k}", classes=4, seed=k)))
        bank = build_bank(backbone, parsed, previous=bank)
    towers = {t: (s.width, s.layers) for t, s in backbone.towers.items()}
    assert tensor_bytes(parsed[0]) == expected_tensor_bytes(towers, backbone.embed_dim)
    assert tensor_bytes(parsed[1]) == expected_tensor_bytes(towers, backbone.embed_dim, existing_per_block=2)
    assert parsed[1].uses  # its router also sees the first task's experts, as a trained one would
    assert list(parsed[0].manifest.classes) == [f"syn-0-class-{i}" for i in range(4)]

    images = torch.rand(4, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(0))
    auto, pinned, zero = classify_batch(
        bank,
        [
            ClassifyItem(images, ("a", "b"), match_labels=False),  # the selectors alone: no task knows a or b
            ClassifyItem(images, ("a", "b"), task="syn-1"),
            ClassifyItem(images, ("a", "b"), task="zero-shot"),
        ],
    )
    assert all(r.route.task is None for r in auto)  # no selector claims anything
    assert all(r.route.task == "syn-1" for r in pinned)
    assert any(abs(p.labels[0][1] - z.labels[0][1]) > 1e-4 for p, z in zip(pinned, zero, strict=True))


def test_the_gate_cost_measurement_runs(backbone):
    from benchmarks.gate_figures import report_seconds

    assert report_seconds(backbone, tasks=3, repeats=1) > 0  # runs end to end; the figure lives in docs/safety.md

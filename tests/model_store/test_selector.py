"""Selectors: in-distribution under the threshold, out-of-distribution over it, and bundle round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_store.selector import SelectorConfig, fit_selector, load_selector, score, selector_manifest


def _cluster(center: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(center + 0.15 * torch.randn(n, center.shape[0], generator=g), dim=-1)


@pytest.mark.parametrize("kind", ["autoencoder", "gaussian"])
def test_separates_two_clusters(kind):
    g = torch.Generator().manual_seed(0)
    a, b = F.normalize(torch.randn(2, 64, generator=g), dim=-1)
    cfg = SelectorConfig(kind=kind, percentile=95.0)
    sel = fit_selector(_cluster(a, 300, g), _cluster(a, 100, g), cfg)
    feats_in = _cluster(a, 200, g)
    inside = score(sel, feats_in)
    outside = score(sel, _cluster(b, 200, g))
    assert (inside <= 1).float().mean() > 0.85
    assert (outside > 1).float().mean() > 0.95
    again = load_selector(selector_manifest(sel, cfg), sel.tensors())
    torch.testing.assert_close(score(again, feats_in), inside)
    assert sel.calibration["n"] == 100 and sel.calibration["p95"] <= sel.calibration["max"]


def test_config_errors_name_fields():
    with pytest.raises(ValueError, match="kind must be one of") as e:
        SelectorConfig(kind="knn", percentile=10)
    assert "percentile" in str(e.value)


def test_threshold_is_the_calibration_percentile_times_margin():
    g = torch.Generator().manual_seed(1)
    train, calib = torch.randn(200, 16, generator=g), torch.randn(50, 16, generator=g)
    cfg = SelectorConfig(kind="gaussian", percentile=90.0, margin=1.5)
    sel = fit_selector(train, calib, cfg)
    expected = 1.5 * float(torch.quantile(sel.error(calib), 0.9))
    assert abs(sel.threshold - expected) < 1e-6 * expected
    assert abs(sel.calibration["p90"] * 1.5 - sel.threshold) < 1e-6 * expected


def test_the_discriminative_kind_learns_its_task_against_negatives_and_is_calibrated_on_held_out_ones():
    from model_store.selector import SelectorConfig, fit_selector, score

    g = torch.Generator().manual_seed(0)
    pos = torch.nn.functional.normalize(torch.randn(300, 16, generator=g) + 1.5, dim=-1)
    neg = torch.nn.functional.normalize(torch.randn(600, 16, generator=g), dim=-1)
    cfg = SelectorConfig(kind="discriminative", lr=1e-2)
    with pytest.raises(ValueError, match="needs negatives"):
        fit_selector(pos[:200], pos[200:], cfg)
    sel = fit_selector(pos[:200], pos[200:], cfg, neg[:400], neg[400:])
    held_neg = (score(sel, neg[400:]) <= 1).float().mean()
    assert held_neg <= cfg.false_claim + 1e-6 and sel.calibration["neg_claimed"] == pytest.approx(float(held_neg))
    assert (score(sel, pos[200:]) <= 1).float().mean() >= cfg.self_claim


def test_negatives_that_look_like_the_task_cannot_take_its_own_images_below_self_claim():
    from model_store.selector import SelectorConfig, fit_selector, score

    g = torch.Generator().manual_seed(1)
    pos = torch.nn.functional.normalize(torch.randn(300, 16, generator=g) + 1.0, dim=-1)
    lookalike = pos[torch.randperm(300, generator=g)] + 0.01 * torch.randn(300, 16, generator=g)
    sel = fit_selector(pos[:200], pos[200:], SelectorConfig(), None, lookalike)
    assert (score(sel, pos[200:]) <= 1).float().mean() >= 0.95
    assert sel.calibration["neg_claimed"] > 0.5  # reported, so the trainer can warn


def test_a_bank_scores_its_selectors_at_once_exactly_as_one_by_one():
    from model_store.selector import SelectorStack, score

    g = torch.Generator().manual_seed(3)
    feats = torch.nn.functional.normalize(torch.randn(40, 32, generator=g), dim=-1)
    kinds = ["autoencoder", "gaussian", "autoencoder", "autoencoder"]
    sels = [
        fit_selector(feats[4 * i : 4 * i + 8], feats[30:34], SelectorConfig(kind=k, epochs=20, seed=i))
        for i, k in enumerate(kinds)
    ]
    stack = SelectorStack(sels)
    assert stack.stacked.tolist() == [0, 2, 3] and [i for i, _ in stack.others] == [1]  # the gaussian alone
    one_by_one = torch.stack([score(s, feats) for s in sels], dim=1)
    assert torch.allclose(stack.scores(feats), one_by_one, rtol=1e-5, atol=1e-6)
    wide = fit_selector(feats[:8], feats[30:34], SelectorConfig(bottleneck=8, epochs=5))  # another bottleneck
    mixed = SelectorStack([sels[0], wide])
    assert mixed.stacked.numel() == 0  # not stackable: every one scored alone, still right
    assert torch.allclose(mixed.scores(feats), torch.stack([score(s, feats) for s in (sels[0], wide)], 1))

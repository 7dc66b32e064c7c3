"""Selectors: in-distribution under the threshold, out-of-distribution over it, and bundle round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_store.errors import BundleInvalid
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
    from model_store.selector import score
    from model_store.selector_stack import SelectorStack

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
    negatives = torch.nn.functional.normalize(torch.randn(50, 32, generator=g) + 0.5, dim=-1)
    hybrids = [
        fit_selector(
            feats[4 * i : 4 * i + 8], feats[30:34], SelectorConfig(kind="hybrid", epochs=20, seed=i), negatives
        )
        for i in range(3)
    ]
    with_hybrids = SelectorStack([sels[0], hybrids[0], sels[1], hybrids[1], hybrids[2]])
    assert with_hybrids.stacked.tolist() == [0, 1, 3, 4] and with_hybrids.hybrid.tolist() == [1, 2, 3]
    one_by_one = torch.stack([score(s, feats) for s in (sels[0], hybrids[0], sels[1], hybrids[1], hybrids[2])], 1)
    assert torch.allclose(with_hybrids.scores(feats), one_by_one, rtol=1e-5, atol=1e-6)
    vetoed = torch.stack([score(h.parts()[1], feats) for h in hybrids], 1) > 1
    assert vetoed.any() and (~vetoed).any()  # the gates both veto and let through here: both branches are checked
    wide = fit_selector(feats[:8], feats[30:34], SelectorConfig(bottleneck=8, epochs=5))  # another bottleneck
    mixed = SelectorStack([sels[0], wide])
    assert mixed.stacked.numel() == 0  # not stackable: every one scored alone, still right
    assert torch.allclose(mixed.scores(feats), torch.stack([score(s, feats) for s in (sels[0], wide)], 1))


def test_the_gates_gelu_is_exact_gelu_in_elementwise_ops():
    """Not F.gelu, which on CPU compiles a oneDNN kernel per input shape and keeps it: a growing bank's gates
    change shape with every task (docs/benchmarks/serve.md, memory)."""
    from model_store.selector import gelu

    x = torch.linspace(-12, 12, 4001)
    torch.testing.assert_close(gelu(x), F.gelu(x), rtol=1e-6, atol=2e-6)


def test_many_images_are_scored_in_chunks_with_the_same_scores(monkeypatch):
    """The gate scores thousands of reference embeddings against every task: in chunks, not one [n, T, D] block."""
    from model_store import selector_stack
    from model_store.selector_stack import SelectorStack

    g = torch.Generator().manual_seed(5)
    feats = F.normalize(torch.randn(90, 32, generator=g), dim=-1)
    negatives = F.normalize(torch.randn(40, 32, generator=g) + 0.5, dim=-1)
    sels = [
        fit_selector(
            feats[8 * i : 8 * i + 8], feats[60:64], SelectorConfig(kind="hybrid", epochs=10, seed=i), negatives
        )
        for i in range(3)
    ]
    stack = SelectorStack(sels)
    whole = stack.scores(feats)
    calls = []
    real = SelectorStack._scores
    monkeypatch.setattr(selector_stack, "CHUNK_VALUES", 3 * 32 * 16)  # 16 images per chunk
    monkeypatch.setattr(SelectorStack, "_scores", lambda self, f: calls.append(len(f)) or real(self, f))
    torch.testing.assert_close(stack.scores(feats), whole)
    assert calls == [16] * 5 + [10]


def test_the_hybrid_kind_claims_only_what_both_parts_claim_and_ranks_by_its_autoencoder():
    from model_store.manifest import _selector_problems

    g = torch.Generator().manual_seed(5)
    a, b = F.normalize(torch.randn(2, 32, generator=g), dim=-1)
    task, near = _cluster(a, 400, g), _cluster(0.6 * a + 0.4 * b, 400, g)  # near: between the task and others
    cfg = SelectorConfig(kind="hybrid", lr=1e-2)
    sel = fit_selector(task[:250], task[250:], cfg, near[:250], near[250:])
    ae, gate = sel.parts()
    assert sel.kind == "hybrid" and (ae.threshold, gate.threshold) == (sel.threshold, sel.calibration["gate_threshold"])
    probe = torch.cat([task[250:], near[250:]])
    both = (score(ae, probe) <= 1) & (score(gate, probe) <= 1)
    assert torch.equal(score(sel, probe) <= 1, both)  # claimed exactly when both parts claim
    assert torch.allclose(score(sel, probe)[both], score(ae, probe)[both])  # ranked on the autoencoder's scale
    assert (score(ae, near[250:]) <= 1).float().mean() > (score(sel, near[250:]) <= 1).float().mean()  # the gate
    assert (score(sel, task[250:]) <= 1).float().mean() >= 0.9

    meta = selector_manifest(sel, cfg)
    again = load_selector(meta, sel.tensors())
    torch.testing.assert_close(score(again, probe), score(sel, probe))
    assert set(sel.tensors()) == {"enc_w", "enc_b", "dec_w", "dec_b", "gate_w1", "gate_b1", "gate_w2", "gate_b2"}
    assert _selector_problems({"selector": meta}) == []
    wide = {**meta, "calibration": {**meta["calibration"], "gate_threshold": 1e6}}
    assert "gate threshold" in _selector_problems({"selector": wide})[0]  # a gate that lets everything through
    gone = {**meta, "calibration": {k: v for k, v in meta["calibration"].items() if k != "gate_threshold"}}
    assert "gate_threshold" in _selector_problems({"selector": gone})[0]
    with pytest.raises(BundleInvalid, match="gate_threshold"):
        load_selector(gone, sel.tensors())


def test_the_hybrid_kind_without_any_negative_is_a_plain_autoencoder(caplog):
    g = torch.Generator().manual_seed(6)
    feats = _cluster(F.normalize(torch.randn(32, generator=g), dim=0), 60, g)
    sel = fit_selector(feats[:40], feats[40:], SelectorConfig(kind="hybrid", epochs=5))
    assert sel.kind == "autoencoder" and "no negatives" in caplog.text

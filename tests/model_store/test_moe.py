"""The MoE forward: exactness of the empty bank, fresh experts, mixed batches and bank growth."""

from __future__ import annotations

import pytest
import torch

from model_store.bank import build_bank, empty_bank
from model_store.bundle import read_bundle
from model_store.experts import MoEConfig, Routing
from model_store.moe_clip import encode_image, encode_text
from tests.helpers import random_bundle


@pytest.fixture(scope="module")
def inputs(backbone):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, backbone.image_size, backbone.image_size, generator=g)
    tokens = backbone.tokenizer(["a photo of a red circle.", "a blue star", "zebra"])
    return images, tokens


@pytest.fixture(scope="module")
def bank_ab(backbone):
    bank_a = build_bank(backbone, [read_bundle(random_bundle(empty_bank(backbone), "a", seed=1))])
    b = read_bundle(random_bundle(bank_a, "b", seed=2))
    return bank_a, build_bank(
        backbone, [read_bundle(random_bundle(empty_bank(backbone), "a", seed=1)), b], previous=bank_a
    )


def test_empty_bank_equals_open_clip(backbone, inputs):
    images, tokens = inputs
    bank = empty_bank(backbone)
    ref_img = backbone.model.encode_image(images, normalize=True)
    ref_txt = backbone.model.encode_text(tokens, normalize=True)
    # no routing at all, and a routing where every sample says "no adapter"
    none = (bank.routing(torch.full((6,), -1)), bank.routing(torch.full((3,), -1)))
    for routing_img, routing_txt in ((None, None), none):
        torch.testing.assert_close(encode_image(backbone.model, images, routing_img), ref_img, atol=1e-5, rtol=0)
        torch.testing.assert_close(encode_text(backbone.model, tokens, routing_txt), ref_txt, atol=1e-5, rtol=0)


def test_fresh_experts_change_nothing(backbone, inputs):
    images, tokens = inputs
    bank = build_bank(backbone, [read_bundle(random_bundle(empty_bank(backbone), "fresh", seed=3, zero_up=True))])
    routed_img = encode_image(backbone.model, images, bank.routing(torch.zeros(6, dtype=torch.long)))
    routed_txt = encode_text(backbone.model, tokens, bank.routing(torch.zeros(3, dtype=torch.long)))
    # Another code path (ours, open_clip's) over the same batch: equal up to float rounding.
    torch.testing.assert_close(routed_img, backbone.model.encode_image(images, normalize=True), atol=1e-5, rtol=0)
    torch.testing.assert_close(routed_txt, backbone.model.encode_text(tokens, normalize=True), atol=1e-5, rtol=0)


def test_random_experts_do_change_the_output(backbone, inputs, bank_ab):
    """Guards the tests above and below against a branch that silently does nothing."""
    images, _ = inputs
    _, bank = bank_ab
    routed = encode_image(backbone.model, images, bank.routing(torch.zeros(6, dtype=torch.long)))
    assert (routed - backbone.model.encode_image(images, normalize=True)).abs().max() > 1e-3


def test_mixed_batch_equals_each_task_alone(backbone, inputs, bank_ab):
    images, _ = inputs
    _, bank = bank_ab
    tasks = torch.tensor([0, 1, -1, 1, 0, -1])
    mixed = encode_image(backbone.model, images, bank.routing(tasks))
    for t in (-1, 0, 1):
        alone = encode_image(backbone.model, images, bank.routing(torch.full((6,), t)))
        rows = tasks == t
        # Other batch compositions take other BLAS kernels on some CPUs: equal up to float rounding.
        torch.testing.assert_close(mixed[rows], alone[rows], atol=1e-5, rtol=0)
    assert not torch.allclose(
        mixed[tasks == 0],
        encode_image(backbone.model, images, bank.routing(torch.ones(6, dtype=torch.long)))[tasks == 0],
    )


def test_adding_task_b_leaves_task_a_bit_identical(backbone, inputs, bank_ab):
    images, tokens = inputs
    bank_a, bank_ab_ = bank_ab
    ia, iab = bank_a.task_index("a"), bank_ab_.task_index("a")
    img_a = encode_image(backbone.model, images, bank_a.routing(torch.full((6,), ia)))
    img_ab = encode_image(backbone.model, images, bank_ab_.routing(torch.full((6,), iab)))
    txt_a = encode_text(backbone.model, tokens, bank_a.routing(torch.full((3,), ia)))
    txt_ab = encode_text(backbone.model, tokens, bank_ab_.routing(torch.full((3,), iab)))
    assert torch.equal(img_a @ txt_a.T, img_ab @ txt_ab.T)
    # B really routes to A's experts too (it sees every published expert), so the bank was shared, not copied
    b = bank_ab_.tasks[bank_ab_.task_index("b")]
    assert b.router.weights["visual"][0].shape[0] == 4


def test_noise_only_in_training(backbone, inputs, bank_ab):
    images, _ = inputs
    _, bank = bank_ab
    task = bank.tasks[0]
    noisy = type(task.router)(
        task.router.weights,
        task.router.slots,
        {t: [torch.ones_like(w) for w in ws] for t, ws in task.router.weights.items()},
    )
    routing = Routing(bank.experts, [noisy], torch.zeros(6, dtype=torch.long), MoEConfig(dropout=0.0), False)
    first = encode_image(backbone.model, images, routing)
    assert torch.equal(first, encode_image(backbone.model, images, routing))
    train = Routing(bank.experts, [noisy], torch.zeros(6, dtype=torch.long), MoEConfig(dropout=0.0), True)
    torch.manual_seed(0)
    assert not torch.equal(encode_image(backbone.model, images, train), first)


def test_top_k_uses_two_experts_per_sample(backbone, bank_ab):
    _, bank = bank_ab
    routing = bank.routing(torch.tensor([0, 1, -1]))
    slots, gates = routing._route("visual", 0, torch.randn(3, backbone.towers["visual"].width))
    assert (slots[:2] >= 0).all() and (slots[2] == -1).all()
    torch.testing.assert_close(gates[:2].sum(1), torch.ones(2))
    assert gates[2].sum() == 0


@pytest.mark.parametrize("ranks", [(8, 8, 8, 8), (8, 16, 8, 4)], ids=["one-rank", "mixed-ranks"])
def test_many_tasks_in_a_batch_take_the_gathered_path_with_the_loops_result(backbone, monkeypatch, ranks):
    """A batch mixing tasks runs its experts as batched products; the result is the per-expert loop's, also when
    the tasks were trained with different expert ranks (a batch of them once failed to stack: a 500 for all)."""
    from model_store import experts as experts_module

    bank, bundles = empty_bank(backbone), []
    for k in range(4):
        bundles.append(read_bundle(random_bundle(bank, f"t{k}", seed=10 + k, rank=ranks[k])))
        bank = build_bank(backbone, bundles, previous=bank)
    images = torch.randn(8, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(4))
    tasks = torch.tensor([0, 1, 2, 3, 3, 2, 1, -1])
    calls = []
    gathered = experts_module.Routing._gathered
    monkeypatch.setattr(experts_module.Routing, "_gathered", lambda self, *a: calls.append(1) or gathered(self, *a))
    fast = encode_image(backbone.model, images, bank.routing(tasks))
    assert calls, "a batch of four tasks should use more than LOOP_MAX_EXPERTS experts in some block"
    monkeypatch.setattr(experts_module, "LOOP_MAX_EXPERTS", 10**9)
    calls.clear()
    loop = encode_image(backbone.model, images, bank.routing(tasks))
    assert not calls
    torch.testing.assert_close(fast, loop, atol=1e-5, rtol=0)
    assert (fast[:7] - backbone.model.encode_image(images[:7], normalize=True)).abs().max() > 1e-3


@pytest.mark.parametrize("share", [0, 10**9], ids=["every-expert-row-by-row", "every-expert-wide"])
def test_training_runs_popular_experts_as_one_wide_adapter_with_the_loops_result(backbone, bank_ab, monkeypatch, share):
    """Training runs the experts most samples chose side by side on every sample (Routing._wide): the same
    outputs and the same gradients as running each expert on its own samples."""
    from model_store import experts as experts_module

    _, bank = bank_ab
    images = torch.randn(8, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(5))
    router = bank.tasks[1].router  # b's routers see a's experts and its own: several used per block

    def forward(dense_share: int) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(experts_module, "DENSE_SHARE", dense_share)
        x = images.clone().requires_grad_(True)
        routing = Routing(bank.experts, [router], torch.zeros(8, dtype=torch.long), MoEConfig(dropout=0.0), True)
        out = encode_image(backbone.model, x, routing)
        (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
        return out.detach(), x.grad

    default_out, default_grad = forward(experts_module.DENSE_SHARE)
    out, grad = forward(share)
    torch.testing.assert_close(out, default_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad, default_grad, atol=1e-5, rtol=1e-4)
    assert (out - backbone.model.encode_image(images, normalize=True)).abs().max() > 1e-3  # the experts do act


def test_rebuilds_reuse_unchanged_task_entries_until_an_expert_leaves(backbone, inputs):
    images, _ = inputs
    bundles = []
    bank = empty_bank(backbone)
    for name, seed in (("a", 21), ("b", 22), ("c", 23)):
        bundles.append(read_bundle(random_bundle(bank, name, seed=seed)))
        bank = build_bank(backbone, bundles, previous=bank)
    ab = build_bank(backbone, bundles[:2])
    abc = build_bank(backbone, bundles, previous=ab)
    assert abc.tasks[0] is ab.tasks[0] and abc.tasks[1] is ab.tasks[1]  # only experts were added: reused
    back = build_bank(backbone, bundles[:2], previous=abc)  # c's experts leave the bank
    assert back.tasks[0] is not abc.tasks[0]
    for t in (0, 1):
        routing = torch.full((6,), t)
        want = encode_image(backbone.model, images, ab.routing(routing))
        for other in (abc, back):
            got = encode_image(backbone.model, images, other.routing(routing))
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # slot order differs: float rounding


def test_a_bank_of_bundles_made_before_moe_was_saved_computes_as_their_routing_says(backbone):
    """Such a bundle (top_k 3 here) was served beside one that said top_k 3 in `moe`; once that one was deleted, a
    restart fell back to the default top_k 2 and left the older bundle out."""
    from tests.helpers import edit_bundle

    data = edit_bundle(
        random_bundle(empty_bank(backbone), "old", seed=5), manifest=lambda m: m["routing"].update(top_k=3)
    )
    old = read_bundle(data)
    assert old.manifest.moe is None
    bank = build_bank(backbone, [old])
    assert (bank.config.top_k, bank.config.scale) == (3, 0.1) and bank.task_names == ("old",)

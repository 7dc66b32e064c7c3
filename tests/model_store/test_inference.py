"""classify_batch: labels, routes, per-request errors, pinning and the text cache."""

from __future__ import annotations

import pytest
import torch

from model_store.bank import build_bank, empty_bank
from model_store.bundle import read_bundle
from model_store.errors import InvalidRequest, TaskNotFound
from model_store.inference import ClassifyItem, TextCache, classify_batch, route_scores
from tests.helpers import random_bundle

ZERO = "zero-shot"


@pytest.fixture(scope="module")
def bank(backbone):
    return build_bank(backbone, [read_bundle(random_bundle(empty_bank(backbone), "a", seed=1, classes=("cat", "dog")))])


def _images(backbone, n, seed=0):
    return torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(seed))


def test_scores_sum_to_one_and_are_sorted(backbone, bank):
    item = ClassifyItem(_images(backbone, 3), ("red", "green", "blue"), task="zero-shot")
    (results,) = classify_batch(bank, [item])
    assert len(results) == 3
    for r in results:
        scores = [s for _, s in r.labels]
        assert scores == sorted(scores, reverse=True)
        assert abs(sum(scores) - 1) < 1e-5
        assert r.route.task is None


def test_pinned_task_without_labels_uses_its_classes(backbone, bank):
    (results,) = classify_batch(bank, [ClassifyItem(_images(backbone, 2), None, task="a", top_k=1)])
    for r in results:
        assert r.route.task == "a" and r.route.version == 1 and r.route.threshold > 0
        assert r.labels[0][0] in ("cat", "dog") and len(r.labels) == 1


def test_a_task_named_as_a_mode_otherwise_is_told_the_modes_spelling(bank):
    """An outside check's `task="zero_shot"` was told only that no such task is active."""
    for name, mode in (("zero_shot", "zero-shot"), ("Zero Shot", "zero-shot"), ("AUTO", "auto")):
        with pytest.raises(TaskNotFound, match=f"task '{name}' is not active \\('{mode}' is the mode of that name\\)"):
            bank.task_index(name)
    with pytest.raises(TaskNotFound, match=r"task 'cats' is not active; active tasks: a$"):
        bank.task_index("cats")


def test_bad_request_fails_alone(backbone, bank):
    good = ClassifyItem(_images(backbone, 2), ("x", "y"), task="a")
    no_labels = ClassifyItem(_images(backbone, 1), None, task="zero-shot")
    unknown = ClassifyItem(_images(backbone, 1), ("x", "y"), task="nope")
    out = classify_batch(bank, [good, no_labels, unknown])
    assert isinstance(out[1], InvalidRequest) and "send labels" in str(out[1])
    assert isinstance(out[2], TaskNotFound)
    assert len(out[0]) == 2 and out[0][0].route.task == "a"


def test_auto_without_labels_leaves_unclaimed_images_unlabelled(backbone):
    (results,) = classify_batch(empty_bank(backbone), [ClassifyItem(_images(backbone, 3), None, task="auto")])
    assert [(r.labels, r.route.task) for r in results] == [([], None)] * 3


BATCH_TOLERANCE = 1e-5  # BLAS kernels change with batch shape, CPU and threads: not bit-equal across batches


def test_batched_equals_alone(backbone, bank):
    items = [ClassifyItem(_images(backbone, 2, s), ("x", "y", "z"), task=t) for s, t in ((1, "a"), (2, "zero-shot"))]
    together = classify_batch(bank, items)
    for item, res in zip(items, together, strict=True):
        (alone,) = classify_batch(bank, [item])
        for r1, r2 in zip(res, alone, strict=True):
            assert (r1.route.task, r1.route.version, r1.route.bundle_id) == (
                r2.route.task,
                r2.route.version,
                r2.route.bundle_id,
            )
            assert (r1.route.score is None) == (r2.route.score is None)
            if r1.route.score is not None:
                assert r1.route.score == pytest.approx(r2.route.score, rel=BATCH_TOLERANCE)
            p1, p2 = dict(r1.labels), dict(r2.labels)
            assert p1.keys() == p2.keys() and max(abs(p1[k] - p2[k]) for k in p1) < BATCH_TOLERANCE


def test_per_request_route_gives_one_decision(backbone, bank):
    item = ClassifyItem(_images(backbone, 4), ("x", "y"), route="per-request", match_labels=False)  # selectors
    (results,) = classify_batch(bank, [item])
    assert len({(r.route.task, r.route.score) for r in results}) == 1


def test_text_cache_hits(backbone, bank):
    cache = TextCache()
    item = ClassifyItem(_images(backbone, 2), ("x", "y"), task="a")
    classify_batch(bank, [item], cache)
    classify_batch(bank, [item], cache)
    assert cache.misses == 1 and cache.hits == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"route": "per-batch"}, "route must be one of"),
        ({"top_k": 0}, "top_k must be >= 1"),
        ({"labels": ("x", "x")}, "distinct"),
        ({"labels": ("Cat", "cat")}, "labels 'Cat' and 'cat' are the same text to the backbone's tokenizer"),
        ({"labels": ("a  b", "a b")}, "same text to the backbone's tokenizer"),
        ({"images": torch.zeros(1, 3, 8, 8)}, "images must be"),
        ({"labels": None, "task": "a", "templates": ("a {}.",)}, "templates need labels"),
        ({"templates": ()}, "templates need labels, and there must be 1 to"),
        ({"templates": ("a {0}.",)}, "exactly one '{}'"),
    ],
)
def test_invalid_items_fail_alone(backbone, bank, kwargs, match):
    good = ClassifyItem(_images(backbone, 1), ("x", "y"), task="zero-shot")
    bad = ClassifyItem(**{"images": _images(backbone, 1), "labels": ("x", "y"), **kwargs})
    out = classify_batch(bank, [bad, good])
    assert isinstance(out[0], InvalidRequest) and match in str(out[0])
    assert len(out[1]) == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"top_k": "2"}, "ClassifyItem.top_k must be an integer, got str '2'"),  # failed its whole batch
        ({"top_k": True}, "ClassifyItem.top_k must be an integer, got bool True"),  # was taken as 1
        ({"match_labels": "false"}, "ClassifyItem.match_labels must be True or False"),  # was taken as True
        ({"labels": (1, 2)}, "ClassifyItem.labels is a tuple of strings, got int 1"),
        ({"templates": "a {}"}, "ClassifyItem.templates is a tuple of strings, got the string 'a {}'"),
    ],
)
def test_a_mistyped_item_is_a_type_error_when_made(backbone, kwargs, match):
    """An outside check of the Python API: these failed a whole batch with a bare TypeError, or were answered."""
    with pytest.raises(TypeError, match=match):
        ClassifyItem(_images(backbone, 1), **{"labels": ("x", "y"), **kwargs})


def test_images_of_another_float_type_are_answered_and_integer_pixels_are_refused(backbone, bank):
    """A float64 tensor (from numpy) failed every request of its batch with "expected scalar type Double"."""
    x = _images(backbone, 2)
    same, double = classify_batch(
        bank, [ClassifyItem(x, ("x", "y"), ZERO), ClassifyItem(x.double(), iter(["x", "y"]), ZERO)]
    )
    assert [r.labels for r in same] == [r.labels for r in double]  # a generator of labels is taken too
    with pytest.raises(TypeError, match=r"images holds torch.uint8 values; preprocessed images are floats"):
        ClassifyItem((x * 50).to(torch.uint8), ("x", "y"))


def test_text_cache_is_bounded_in_bytes():
    cache = TextCache(maxsize=100, max_bytes=10_000)
    for i in range(10):
        cache.get_or_compute(("zero-shot", (f"l{i}",), ("t",)), lambda: torch.zeros(4, 256))  # 4 KiB each
    assert len(cache) == 2 and cache.bytes_held <= 10_000
    assert cache.get_or_compute(("big",), lambda: torch.zeros(10, 1000)).shape == (10, 1000)  # returned, not kept
    assert len(cache) == 2


def test_long_label_lists_are_encoded_in_chunks(backbone, bank):
    from model_store.text import TEXT_CHUNK, text_embeddings

    labels = [f"label {i}" for i in range(TEXT_CHUNK + 7)]
    emb = text_embeddings(bank, -1, labels, ("a photo of a {}.",))
    assert emb.shape == (len(labels), backbone.embed_dim)
    one = text_embeddings(bank, -1, labels[-1:], ("a photo of a {}.",))
    assert torch.allclose(emb[-1], one[0], atol=1e-5)


def test_templates_of_the_item_score_its_labels_on_every_route(backbone, bank):
    """An item's own prompt ensemble replaces the route's templates: the scores are softmax(logit_scale * e @ T.T)
    with T the renormalised mean of the per-template text embeddings, whether the image is pinned or zero-shot."""
    from model_store.moe_clip import encode_image, encode_text

    labels, templates = ("cat", "dog", "bird"), ("a photo of a {}.", "a drawing of the {}.")
    x = _images(backbone, 2, seed=3)
    with torch.no_grad():
        per = [encode_text(backbone.model, backbone.tokenizer([t.format(c) for c in labels])) for t in templates]
        text = torch.nn.functional.normalize(torch.stack(per).mean(0), dim=-1)
        expected = (backbone.model.logit_scale.exp() * encode_image(backbone.model, x) @ text.T).softmax(-1)
    (results,) = classify_batch(bank, [ClassifyItem(x, labels, task="zero-shot", templates=templates)])
    for r, row in zip(results, expected, strict=True):
        got = dict(r.labels)
        assert [got[c] for c in labels] == pytest.approx(row.tolist(), abs=1e-4)
    plain = classify_batch(bank, [ClassifyItem(x, labels, task="zero-shot")])[0]
    assert [dict(r.labels) for r in plain] != [dict(r.labels) for r in results]  # the ensemble did change them
    pinned = classify_batch(bank, [ClassifyItem(x, labels, task="a", templates=templates)])[0]
    pinned_default = classify_batch(bank, [ClassifyItem(x, labels, task="a")])[0]
    assert [dict(r.labels) for r in pinned] != [dict(r.labels) for r in pinned_default]


def test_a_score_that_is_not_a_number_claims_nothing_and_hides_no_claim():
    """A selector overflowing on some input gives NaN: `min` would make it the row's best and send the image to
    zero-shot whatever the other tasks say. It must neither take the image nor hide another task's claim."""
    nan = float("nan")
    inf = float("inf")
    scores = torch.tensor([[0.5, nan, 2.0], [nan, 0.9, 0.3], [nan, nan, nan], [nan, 1.5, 3.0], [inf, nan, inf]])
    tasks, best = route_scores(scores)
    assert tasks.tolist() == [0, 2, -1, -1, -1]
    assert best.tolist() == pytest.approx([0.5, 0.3, inf, 1.5, inf])  # infinities stay infinite (shown as null)


def test_a_bank_prints_as_a_summary_not_its_tensors(bank):
    text = repr(bank)
    assert text.startswith("BankSnapshot(generation=0, tasks=[a v1], experts=") and "shadows=[]" in text
    assert "tensor" not in text and len(text) < 200, text
    assert "tensor" not in repr(bank.tasks[0]) and len(repr(bank.tasks[0])) < 400

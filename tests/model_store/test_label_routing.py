"""Label-aware routing: with task=auto and labels, only tasks that know one of the labels may claim an image."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from model_store.bank import build_bank, empty_bank
from model_store.bundle import read_bundle
from model_store.inference import ClassifyItem, classify_batch, known_tasks, route_scores, select_tasks, task_scores
from model_store.labels import label_key
from tests.helpers import over_broad, random_bundle

# two tasks; for each image, task 0 has the lower score, and both claim it (scores under 1)
SCORES = torch.tensor([[0.2, 0.5], [0.3, 0.9], [0.1, 1.5]])


def _bank(*classes: tuple[str, ...]) -> SimpleNamespace:
    """What `select_tasks` reads of a bank: its tasks and their class names as label keys."""
    return SimpleNamespace(
        tasks=classes, label_sets=tuple(frozenset(label_key(c) for c in cs) for cs in classes), task_index=None
    )


BANK = _bank(("stripes", "dots"), ("letter a", "letter b"))


def _item(labels, route="per-image", match=True) -> ClassifyItem:
    return ClassifyItem(torch.zeros(3, 3, 2, 2), labels, route=route, match_labels=match)


def test_label_keys_ignore_case_and_spacing():
    assert label_key("  Letter \t A ") == "letter a"
    assert known_tasks(BANK, ["LETTER   a", "zebra"]).tolist() == [False, True]
    assert known_tasks(BANK, ["dots", "letter b"]).tolist() == [True, True]
    assert known_tasks(BANK, ["zebra"]).tolist() == [False, False]
    assert known_tasks(BANK, ["Letter_A"]).tolist() == [False, True]  # a folder's name, as the trainer reads it


def test_label_keys_drop_what_is_drawn_as_nothing_and_keep_what_makes_a_name():
    from model_store.labels import label_problem

    assert label_key("cat\ufe0f") == label_key("c\u200bat") == label_key("cat\u00ad") == "cat"
    family, apart = "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f468\U0001f469\U0001f467"
    england = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"
    scotland = "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"
    assert label_key(family) != label_key(apart) and label_key(england) != label_key(scotland)
    # labels of marks alone mean something (Thai tone marks, a lone accent): refused only when nothing is there
    for label in ("\u0e48", "\u0941", "\u00a0\u0301", "e\u0301", "\u263a\ufe0f", family, england):
        assert label_problem(label) is None, repr(label)
    for label in ("\u3164", "\ufe0f", "\u200b\u2060 ", "\u115f\u034f"):
        assert label_problem(label) == "has no visible character", repr(label)


def test_a_folders_name_routes_to_the_class_the_trainer_made_of_it():
    """The trainer reads `_` in a folder name as a space: a client sending the folder names it knows
    (`blue_square`) was answered by zero-shot CLIP, while "blue square" reached the task."""
    from training.data import class_name

    assert label_key("blue_square") == label_key(class_name("blue_square")) == "blue square"


def test_label_keys_ignore_composed_or_decomposed_unicode():
    """A class from a folder named on macOS ("cafe" + a combining accent) was unknown to the label "café" typed
    elsewhere: its task could not claim the image, and zero-shot answered "zebra"."""
    nfd, nfc = "rouge cafe\u0301", "Rouge Caf\u00e9"
    assert label_key(nfd) == label_key(nfc) == "rouge caf\u00e9"
    bank = _bank(("stripes",), (nfd, "bleu"))
    assert known_tasks(bank, [nfc, "zebra"]).tolist() == [False, True]
    assert known_tasks(_bank((nfc,)), [nfd]).tolist() == [True]


def test_only_a_task_that_knows_a_label_may_claim():
    tasks, best = select_tasks(BANK, SCORES, _item(("letter a", "letter c")))
    # task 0's lower scores do not count: it knows none of the labels; task 1 takes what it claims (score <= 1)
    assert tasks.tolist() == [1, 1, -1]
    assert best[:2].tolist() == pytest.approx([0.5, 0.9]) and best[2].item() == pytest.approx(1.5)


def test_labels_no_task_knows_go_to_zero_shot_with_no_score():
    tasks, best = select_tasks(BANK, SCORES, _item(("zebra", "horse")))
    assert tasks.tolist() == [-1, -1, -1] and all(math.isnan(b) for b in best.tolist())


def test_the_selectors_alone_when_asked_or_when_every_task_knows_a_label():
    image_only = route_scores(SCORES)
    for item in (_item(("zebra",), match=False), _item(("dots", "letter a")), _item(None)):
        tasks, best = select_tasks(BANK, SCORES, item)
        assert tasks.tolist() == image_only[0].tolist() == [0, 0, 0]
        assert best.tolist() == pytest.approx(image_only[1].tolist())


def test_per_request_routing_averages_over_the_tasks_that_know_a_label():
    tasks, best = select_tasks(BANK, SCORES, _item(("letter b",), route="per-request"))
    # task 0 has the lower mean (0.2) but knows no label; task 1's mean, (0.5 + 0.9 + 1.5) / 3, is under 1
    assert tasks.tolist() == [1, 1, 1] and best.tolist() == pytest.approx([2.9 / 3] * 3)
    tasks, _ = select_tasks(BANK, SCORES * 1.1, _item(("letter b",), route="per-request"))
    assert tasks.tolist() == [-1, -1, -1]  # its mean above 1: the whole request to zero-shot, not to task 0


def test_through_classify_batch_a_claiming_task_is_skipped_for_labels_it_does_not_know(backbone):
    """A selector that claims every image takes them for its own labels, never for labels it does not know."""
    bank0 = empty_bank(backbone)
    bundle = over_broad(random_bundle(bank0, "pets", seed=3, classes=("cat", "dog")))
    bank = build_bank(backbone, [read_bundle(bundle)])
    images = torch.randn(4, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(0))
    own, other, ignored = classify_batch(
        bank,
        [
            ClassifyItem(images, ("Cat", "bird")),
            ClassifyItem(images, ("car", "bird")),
            ClassifyItem(images, ("car", "bird"), match_labels=False),
        ],
    )
    assert [r.route.task for r in own] == ["pets"] * 4
    assert [(r.route.task, r.route.score) for r in other] == [(None, None)] * 4
    assert [r.route.task for r in ignored] == ["pets"] * 4
    claimed = route_scores(task_scores(bank, backbone.frozen.image(images).float()))[0]
    assert claimed.tolist() == [0] * 4  # the selector alone claims them all: only the labels decided `other`
    assert sorted(label for label, _ in other[0].labels) == ["bird", "car"]
    # the answers say which images the labels moved: the selectors alone would have sent `other` to pets
    assert [r.moved_by_labels for r in own + other + ignored] == [False] * 4 + [True] * 4 + [False] * 4


def test_a_classify_item_of_pil_images_or_one_label_string_is_a_named_type_error():
    """The package docstring's `ClassifyItem(images, ...)` with a list of PIL images failed deep inside with
    "'list' object has no attribute 'ndim'"."""
    from PIL import Image

    with pytest.raises(TypeError, match=r"tensor \[n, 3, H, W\] of preprocessed images, got list: torch.stack"):
        ClassifyItem([Image.new("RGB", (4, 4))], ("cat", "dog"))
    with pytest.raises(TypeError, match="ClassifyItem.labels is a tuple of strings, got the string 'cat,dog'"):
        ClassifyItem(torch.zeros(1, 3, 2, 2), "cat,dog")


def test_a_label_naming_a_class_as_routing_matches_it_is_scored_as_that_class(backbone):
    """An outside check: `weißes_rauschen` (the folder's name) was routed to the task that knows "weißes rauschen",
    then scored as the literal text the task never learned (0 of 20 right, against 20 of 20 with the class as
    written). Labels the task does not know, and labels for zero-shot CLIP, are scored as sent."""
    from model_store.errors import InvalidRequest

    bank0 = empty_bank(backbone)
    classes = ("weißes rauschen", "sel et poivre", "three quarters")
    bank = build_bank(backbone, [read_bundle(random_bundle(bank0, "noise", seed=5, classes=classes))])
    images = torch.randn(3, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(1))

    def scores(labels, task="noise"):
        (results,) = classify_batch(bank, [ClassifyItem(images, labels, task=task)])
        if isinstance(results, Exception):  # a request's own error is its answer
            raise results
        return [dict(r.labels) for r in results]

    as_written = scores(("weißes rauschen", "sel et poivre", "zebra"))
    as_folders = scores(("Weißes_Rauschen", "sel_et_poivre", "zebra"))
    for a, b in zip(as_written, as_folders, strict=True):
        assert set(b) == {"Weißes_Rauschen", "sel_et_poivre", "zebra"}  # answered with the labels as sent
        assert b["Weißes_Rauschen"] == pytest.approx(a["weißes rauschen"], abs=1e-5)
        assert b["sel_et_poivre"] == pytest.approx(a["sel et poivre"], abs=1e-5)
    zero_shot = scores(("weißes_rauschen", "weißes rauschen"), task="zero-shot")  # the frozen tower: as sent
    assert any(abs(r["weißes_rauschen"] - r["weißes rauschen"]) > 1e-4 for r in zero_shot)
    with pytest.raises(InvalidRequest, match="name the same class"):  # one class twice, through the task
        scores(("three_quarters", "three quarters"))


def test_labels_a_task_never_learned_get_only_the_share_both_the_task_and_zero_shot_give_them():
    from model_store.inference import split_probs

    task = torch.tensor([[2.0, 0.0, 1.0, 3.0], [3.0, 0.0, 1.0, 0.0]])  # logits over (a, b | x, y): a, b learned
    zero_shot = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 4.0]])
    probs = split_probs(task, zero_shot, ([0, 1], [2, 3]))
    assert probs.sum(-1).tolist() == pytest.approx([1.0, 1.0])
    task_u, zs_u = task.softmax(-1)[:, 2:].sum(-1), zero_shot.softmax(-1)[:, 2:].sum(-1)
    share = torch.minimum(task_u, zs_u)  # row 0: zero-shot's 0.5 (the task's 0.73); row 1: the task's 0.15
    assert probs[:, 2:].sum(-1).tolist() == pytest.approx(share.tolist())
    assert share.tolist() == pytest.approx([zs_u[0].item(), task_u[1].item()]) and task_u[0] > zs_u[0]
    # within each side, the order and ratios of the one that knows: the task over a, b; zero-shot over x, y
    ratios = torch.cat([probs[:, :2] / probs[:, :2].sum(-1, keepdim=True), probs[:, 2:] / share[:, None]], -1)
    want = torch.cat([task[:, :2].softmax(-1), zero_shot[:, 2:].softmax(-1)], -1)
    assert ratios.flatten().tolist() == pytest.approx(want.flatten().tolist())
    # logits far apart: no 0/0 where the task's mass on its own labels underflows
    far = split_probs(torch.tensor([-300.0, -300.0, 300.0]), torch.tensor([0.0, 0.0, 300.0]), ([0, 1], [2]))
    assert far.isfinite().all() and far.tolist() == pytest.approx([0.0, 0.0, 1.0])
    # a review: 1 - share was 0 in float32 once both put all but 1e-11 on the new label; the task's order was lost
    near = split_probs(torch.tensor([-1.0, 0.0, 25.0]), torch.tensor([0.0, 0.0, 25.0]), ([0, 1], [2]))
    assert 0 < near[0] < near[1] < 1e-9 and near[1] / near[0] == pytest.approx(math.e, rel=1e-4)


def test_through_classify_batch_labels_the_task_partly_knows_are_split_between_it_and_zero_shot(backbone):
    """An outside check: a 5-class task fell from 72% to 29% right on its own images once the client's labels
    held 2 names it never learned, which its experts scored, wrongly, above its own classes."""
    from model_store.inference import ImagePasses, split_probs
    from model_store.text import text_embeddings

    bank0 = empty_bank(backbone)
    bundle = over_broad(random_bundle(bank0, "pets", seed=3, classes=("cat", "dog")))
    bank = build_bank(backbone, [read_bundle(bundle)])
    images = torch.randn(3, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(2))
    labels = ("Dog", "zebra", "cat")
    item = ClassifyItem(images, labels)
    (answers,) = classify_batch(bank, [item])
    assert [r.route.task for r in answers] == ["pets"] * 3
    passes = ImagePasses(bank, [item])
    while not passes.step(64):
        pass
    scale = bank.backbone.model.logit_scale.exp()
    task = scale * passes.feats @ text_embeddings(bank, 0, labels, bank.tasks[0].templates).T
    as_learned = ("dog", "zebra", "cat")  # zero-shot CLIP sees a learned class by the task's name for it
    zero_shot = scale * passes.frozen @ text_embeddings(bank, -1, as_learned, ("a photo of a {}.",)).T
    expected = split_probs(task, zero_shot, ([0, 2], [1]))
    for r, want in zip(answers, expected, strict=True):
        assert dict(r.labels) == pytest.approx(dict(zip(labels, want.tolist(), strict=True)), abs=1e-5)
    # the task alone over its own labels, the selectors alone (match_labels=False), and zero-shot: as before
    for other, task_index, words in (
        (ClassifyItem(images, ("dog", "cat")), 0, ("dog", "cat")),
        (ClassifyItem(images, labels, match_labels=False), 0, labels),
        (ClassifyItem(images, labels, task="zero-shot"), -1, labels),
    ):
        (got,) = classify_batch(bank, [other])
        feats = passes.feats if task_index == 0 else passes.frozen
        templates = bank.tasks[0].templates if task_index == 0 else ("a photo of a {}.",)
        probs = (scale * feats @ text_embeddings(bank, task_index, words, templates).T).softmax(-1)
        for r, want in zip(got, probs, strict=True):
            assert dict(r.labels) == pytest.approx(dict(zip(words, want.tolist(), strict=True)), abs=1e-5)


def test_twin_labels_that_look_alike_say_where_they_differ_and_why():
    """An integrator's two 199-character labels differing past the tokenizer's context were shown cut, looking
    the same; `café` composed and decomposed were said to differ by case or spacing."""
    from model_store.labels import twin_message

    long_a, long_b = "x" * 150 + "a", "x" * 150 + "b"
    message = twin_message((long_a, long_b))
    assert "(they differ first at character 151)" in message
    assert "how accents are composed" in twin_message(("caf\u00e9", "cafe\u0301"))
    assert "differ first" not in twin_message(("Cat", "cat"))  # shown apart already

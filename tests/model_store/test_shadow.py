"""Shadow scoring decides as the bank it would join decides: its score takes its task's place in the bank's task
order (replacing an active version of the same task), per-request routing averages, argmin, zero-shot above 1."""

from __future__ import annotations

import torch

from model_store.inference import ClassifyItem, route_scores
from model_store.modes import PER_REQUEST, ZERO_SHOT
from model_store.shadow import AutoSpan, _would_claim, auto_rows, auto_spans


def test_its_column_goes_where_promotion_puts_it():
    scores = torch.tensor([[0.5, 0.9], [2.0, 3.0], [0.2, 0.1]])  # tasks "a", "c"
    own = torch.tensor([0.4, 0.8, 0.2])
    # a new task "b": its column goes between a's and c's
    assert _would_claim(["a", "c"], scores, own, "b").tolist() == [True, True, False]
    promoted = torch.stack([scores[:, 0], own, scores[:, 1]], dim=1)
    assert (route_scores(promoted)[0] == 1).tolist() == [True, True, False]
    # a new version of "a": replaces a's column, so it competes with c only
    assert _would_claim(["a", "c"], scores, torch.tensor([0.95, 1.5, 0.05]), "a").tolist() == [False, False, True]
    assert _would_claim([], torch.empty(2, 0), torch.tensor([0.5, 1.5]), "z").tolist() == [True, False]


def test_only_answered_auto_requests_are_watched():
    img = torch.zeros(2, 3, 4, 4)
    items = [
        ClassifyItem(img),
        ClassifyItem(img, task=ZERO_SHOT),
        ClassifyItem(img, route=PER_REQUEST),
        ClassifyItem(img),
    ]
    spans = {0: (0, 2), 1: (2, 4), 2: (4, 6), 3: (6, 8)}
    out = [None, None, None, ValueError("failed")]
    assert auto_spans(items, spans, out) == [AutoSpan(0, 2), AutoSpan(4, 6, per_request=True)]
    assert auto_rows(auto_spans(items, spans, out)).tolist() == [0, 1, 4, 5]


def test_a_shadow_claims_only_for_labels_it_knows_as_promotion_would():
    """Label-aware routing in shadow: a request's labels leave out every task, the shadow included, that knows
    none of them; a request that routes on the selectors alone (`match_labels=False`) is scored as before."""
    from types import SimpleNamespace

    from model_store.bank import ShadowEntry
    from model_store.labels import label_key
    from model_store.shadow import observe

    class FirstColumn:  # a selector whose score is the embedding's first value
        threshold = 1.0

        def error(self, feats):
            return feats[:, 0]

    img = torch.zeros(2, 3, 4, 4)
    items = [ClassifyItem(img, ("Dog",)), ClassifyItem(img, ("cat",)), ClassifyItem(img, ("cat",), match_labels=False)]
    spans = auto_spans(items, {0: (0, 2), 1: (2, 4), 2: (4, 6)}, [None] * 3)
    assert [s.labels for s in spans] == [("Dog",), ("cat",), None]
    bank = SimpleNamespace(
        shadows=(ShadowEntry("b", 1, "x" * 64, FirstColumn(), frozenset({label_key("dog")})),),
        task_names=("a", "c"),
        label_sets=(frozenset({"cat"}), frozenset({"letter x"})),
    )
    frozen = torch.tensor([[0.5], [0.9], [0.5], [0.05], [0.5], [0.05]])  # the shadow's own score per image
    scores = torch.tensor([[0.1, 2.0], [0.2, 2.0], [0.1, 2.0], [0.2, 2.0], [0.1, 2.0], [0.2, 2.0]])  # a claims all
    (seen,) = observe(bank, frozen, scores, torch.zeros(6, dtype=torch.long), spans)
    # "dog": a knows no label, so the shadow takes both; "cat": the shadow may not claim, however low its score;
    # the selectors alone: it takes the image whose score is below a's
    assert seen.claimed.tolist() == [True, True, False, False, False, True]

"""Task-agnostic evaluation (ODCL-CIL style): every test image of the sequence scored against the union of all
the classes seen, not only its own task's. A routed image that lands on the wrong task's experts, or a fine-tuned
model that drifted toward the last task's classes, is then caught even when its own task's labels would hide it.

Classes shared by name across domains (the shape names of `sketches`, `crowds`, `zoomed`) count once: an image
answered with its class's name is right whichever domain taught it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from model_store.bank import BankSnapshot
from model_store.inference import AUTO, TextCache

from .cl_common import TEMPLATE, SequenceStep
from .data import LabelledImages
from .evaluate import accuracy_and_routes


def union_classes(seq: Sequence[SequenceStep]) -> tuple[str, ...]:
    """Every class of the sequence, in order of first appearance, each name once."""
    return tuple(dict.fromkeys(c for d in seq for c in d.classes))


def _scores(per_domain: dict[str, float]) -> dict[str, Any]:
    mean = sum(per_domain.values()) / len(per_domain)
    return {"per_domain": {k: round(100 * v, 2) for k, v in per_domain.items()}, "mean": round(100 * mean, 2)}


def agnostic_of_bank(bank: BankSnapshot, seq: Sequence[SequenceStep], oracle: bool = False) -> dict[str, Any]:
    """The final bank's accuracy over the union of classes: auto-routed, or (`oracle`) pinned to each image's own
    task, as the server answers a request whose labels are the union. Every method scores the union with the one
    plain template: the domains' prompt ensembles (real protocols) differ, and a union has no ensemble of its own."""
    union, cache = union_classes(seq), TextCache()
    acc = {
        d.name: accuracy_and_routes(
            bank, d.test.with_classes(union), d.name if oracle else AUTO, cache, templates=(TEMPLATE,)
        )[0]
        for d in seq
    }
    return _scores(acc)


def agnostic_of_model(accuracy: Callable[[LabelledImages], float], seq: Sequence[SequenceStep]) -> dict[str, Any]:
    """A single model's (zero-shot, fine-tuned, interpolated) accuracy over the union of classes, given its
    `accuracy(labelled_images)`."""
    union = union_classes(seq)
    return _scores({d.name: accuracy(d.test.with_classes(union)) for d in seq})

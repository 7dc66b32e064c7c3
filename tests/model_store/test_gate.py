"""The gate's report on its own: what is measured, what cannot be, and how offences read."""

from __future__ import annotations

from model_store.bank import build_bank, empty_bank
from model_store.bundle import read_bundle
from model_store.gate import GateLimits, GateReport, interference
from model_store.reference import find_reference
from tests.helpers import random_bundle


def test_tasks_without_probes_and_a_missing_reference_are_reported_as_unmeasured(backbone):
    a = read_bundle(random_bundle(empty_bank(backbone), "a", seed=1))  # random bundles carry no probes
    b = read_bundle(random_bundle(empty_bank(backbone), "b", seed=2))
    bank = build_bank(backbone, [a, b])
    report = interference(bank, "b", None, GateLimits())
    assert report.self_claim is None and report.zero_shot_captured is None and report.unmeasured == ("a",)
    assert report.offences() == [] and report.to_json()["passed"]


def test_a_random_selector_claims_the_reference_and_the_offence_says_so(backbone):
    a = read_bundle(random_bundle(empty_bank(backbone), "a", seed=1))
    report = interference(build_bank(backbone, [a]), "a", find_reference(backbone).embeddings, GateLimits())
    assert report.zero_shot_captured > 0.5  # what makes the service tests relax this limit for random bundles
    (offence,) = report.offences()
    assert "outside images that now go to zero-shot" in offence and "limit 5.0%" in offence


def test_offences_list_the_worst_task_first():
    report = GateReport("new", 1, 0.99, {"a": 0.03, "b": 0.5, "c": 0.01}, 0.0, (), GateLimits(max_stolen=0.02))
    offences = report.offences()
    assert len(offences) == 2 and "'b'" in offences[0] and "'a'" in offences[1]


def test_offences_show_small_limits_and_near_misses_with_the_digits_they_need():
    """A server with `--gate-max-zero-shot 0.0001` refused a version "claiming 0.1% (limit 0.0%)"."""
    limits = GateLimits(max_stolen=0.02, max_zero_shot_captured=0.0001)
    report = GateReport("new", 1, 0.99, {"a": 0.0204, "b": 0.058}, 0.0005, (), limits)
    assert report.offences() == [
        "it would take 5.8% of the images of task 'b' (limit 2.0%)",
        "it would take 2.04% of the images of task 'a' (limit 2.00%)",
        "it would claim 0.050% of outside images that now go to zero-shot (limit 0.010%)",
    ]

"""The manifest schema: every field bounded, every problem named at once; bounded JSON for untrusted text."""

from __future__ import annotations

import json

import pytest

from model_store.bank import build_bank, empty_bank
from model_store.bundle import read_bundle
from model_store.errors import BundleInvalid
from model_store.experts import MoEConfig
from model_store.labels import MAX_CLASSES, template_ok
from model_store.manifest import Manifest, manifest_problems
from model_store.safejson import JSONRefused, loads
from tests.helpers import edit_bundle, random_bundle


@pytest.fixture(scope="module")
def manifest(backbone) -> dict:
    return read_bundle(random_bundle(empty_bank(backbone), "m", seed=2)).manifest.to_json()


def _with(manifest: dict, **changes) -> dict:
    m = json.loads(json.dumps(manifest))
    for path, value in changes.items():
        node, keys = m, path.split("__")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return m


def test_a_valid_manifest_has_no_problem(manifest):
    assert manifest_problems(manifest) == []


@pytest.mark.parametrize(
    "template, ok",
    [
        ("a photo of a {}.", True),
        ("{}", True),
        ("a {} and {{braces}}", True),
        ("{:>300000000}", False),
        ("{!r}", False),
        ("{0}", False),
        ("{label}", False),
        ("no field", False),
        ("{} and {}", False),
        ("{", False),
        ("{}" + "x" * 400, False),
        (3, False),
    ],
)
def test_templates_take_one_plain_field(template, ok):
    assert template_ok(template) is ok


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"created_at": {"a": 1}}, "created_at"),
        ({"created_at": "yesterday"}, "created_at"),
        ({"parent": [1]}, "parent"),
        ({"training": [1]}, "training"),
        ({"version": 2**40}, "version"),
        ({"classes": ["a"] * 2}, "classes"),
        ({"classes": ["c" * 201]}, "classes"),
        ({"classes": [f"c{i}" for i in range(MAX_CLASSES + 1)]}, "classes"),
        ({"templates": ["{}"] * 200}, "templates"),
        ({"classes": [f"c{i}" for i in range(9000)], "templates": [f"{i} {{}}" for i in range(12)]}, "prompts"),
        ({"routing__top_k": 1000}, "top_k"),
        ({"routing__scale": -1}, "routing.scale"),
        ({"selector__kind": "oracle"}, "selector kind"),
        ({"selector__threshold": 1e30}, "claim images of every other domain"),
        ({"selector__calibration": {"p50": 1}}, "calibration"),
        ({"selector__config": 5}, "selector config"),
        ({"selector__config": None}, "selector config"),
        ({"selector__config": "ab"}, "selector config"),
        ({"selector__calibration__p50": 1e9}, "ordered"),
        ({"backbone__fingerprint": "abc"}, "fingerprint"),
        ({"content_sha256": 5}, "content_sha256"),
    ],
)
def test_each_bad_field_is_named(manifest, changes, words):
    problems = manifest_problems(_with(manifest, **changes))
    assert problems and any(words in p for p in problems), problems


def test_every_problem_is_reported_at_once(manifest):
    problems = manifest_problems(_with(manifest, version=0, created_at=5, templates=["{:x}"], selector__kind="x"))
    assert len(problems) == 4, problems


def test_an_echoed_value_is_cut_short(manifest):
    (problem,) = manifest_problems(_with(manifest, task="A" * 100_000))
    assert len(problem) < 200


def test_read_bundle_reports_the_problems(backbone):
    from tests.helpers import edit_bundle

    data = random_bundle(empty_bank(backbone), "m", seed=2)
    with pytest.raises(BundleInvalid, match="created_at.*templates|templates.*created_at"):
        read_bundle(edit_bundle(data, manifest=lambda m: m.update(created_at={}, templates=["{:>9}"])))


@pytest.mark.parametrize(
    "text, words",
    [
        ("[" * 100_000, "nested deeper"),
        ("[" * 40 + "]" * 40, "nested deeper"),
        ('{"a": ' + "9" * 5001 + "}", "digits"),
        ("[" + "9" * 20 + "]", "digits"),
        ("[NaN]", "not a JSON number"),
        ("[-Infinity]", "not a JSON number"),
        ("[1e999]", "overflows"),
        ("[1,", "Expecting"),
        (b"\xff\xfe", "Expecting value|utf"),
    ],
)
def test_bounded_json_refuses(text, words):
    with pytest.raises(JSONRefused, match=f"(?i){words}"):
        loads(text)


def test_bounded_json_reads_what_bundles_hold():
    doc = {"a": [1, 2.5, -3, None, True, "x"], "b": {"c": [[[]]]}, "n": 2**62}
    assert loads(json.dumps(doc)) == doc


def test_the_bundles_word_on_its_negatives_does_not_raise_the_threshold_ceiling(manifest):
    """A security check: a threshold of 1e30 passed with a `neg_p01` of 1e30 (the ceiling was the larger of `max`
    and `neg_p01`), and once forced in, that task claimed every unlabelled image. Calibration only lowers a
    threshold below margin x max, so the ceiling is 4x `max` alone, as docs/bundle-format.md says."""
    cal = {"p50": 0.001, "p90": 0.002, "p95": 0.003, "p99": 0.005, "max": 0.01, "neg_p01": 1e30}
    assert manifest_problems(_with(manifest, selector__calibration=cal, selector__threshold=0.04)) == []
    for threshold in (0.1, 1e30):
        too_far = _with(manifest, selector__calibration=cal, selector__threshold=threshold)
        assert any("claim images of every other domain" in p for p in manifest_problems(too_far)), threshold
    # calibration's floor: a task of near-identical images has a largest error of 7e-15 and a threshold of 1e-12
    tiny = {"p50": 1e-15, "p90": 2e-15, "p95": 3e-15, "p99": 5e-15, "max": 7e-15}
    assert manifest_problems(_with(manifest, selector__calibration=tiny, selector__threshold=1e-12)) == []
    hybrid = _with(manifest, selector__kind="hybrid", selector__calibration={**cal, "gate_max": 0.5})
    hybrid["selector"]["threshold"] = 0.02
    for gate, ok in ((2.0, True), (1e30, False)):
        hybrid["selector"]["calibration"].update(gate_threshold=gate, gate_neg_p01=1e30)
        assert (manifest_problems(hybrid) == []) is ok, (gate, manifest_problems(hybrid))


def test_the_typed_manifest_keeps_the_json_layout(manifest):
    typed = Manifest.from_json(manifest)
    assert typed.to_json() == manifest  # the bundle format is unchanged: what is read is what is written
    assert typed.routing.top_k == manifest["routing"]["top_k"] and typed.classes == tuple(manifest["classes"])
    assert typed.routing.expert_ids() == {e for t in ("visual", "text") for ids in manifest["routing"][t] for e in ids}
    assert typed.moe is None  # a bundle made without it: the bank's settings apply


def test_from_json_names_every_problem_in_one_error(manifest):
    bad = _with(manifest, version=0, task="Bad Name", selector__threshold=-1)
    with pytest.raises(BundleInvalid) as caught:
        Manifest.from_json(bad)
    message = str(caught.value)
    assert "version must be" in message and "task 'Bad Name'" in message and "threshold" in message


@pytest.mark.parametrize(
    "moe, words",
    [
        ({"rank": 8.5, "scale": 0.1, "top_k": 2, "dropout": 0.1, "noise_eps": 0.01}, "moe.rank must be an integer"),
        ({"rank": 8, "scale": 0.1, "top_k": 2, "dropout": 2.0, "noise_eps": 0.01}, "dropout"),
        ({"rank": 8, "scale": 0.1, "top_k": 2}, "moe must hold"),
        ({"rank": 8, "scale": 0.5, "top_k": 2, "dropout": 0.1, "noise_eps": 0.01}, "must equal routing"),
        # once accepted: the bank then computed with scale -5, and refused every normal bundle after it
        ({"rank": 8, "scale": -5.0, "top_k": 2, "dropout": 0.1, "noise_eps": 0.01}, "scale must be in (0, 100.0]"),
        ({"rank": 8, "scale": 0.1, "top_k": 2, "dropout": 0.1, "noise_eps": -1e308}, "noise_eps must be in [0, 1.0]"),
    ],
)
def test_a_saved_moe_config_is_checked(manifest, moe, words):
    problems = manifest_problems(_with(manifest, moe=moe))
    assert any(words in p for p in problems), problems


def test_a_saved_moe_config_is_read_typed(manifest):
    moe = {"rank": 8, "scale": 0.1, "top_k": 2, "dropout": 0.0, "noise_eps": 0.0}
    typed = Manifest.from_json(_with(manifest, moe=moe))
    assert typed.moe == MoEConfig(**moe) and typed.to_json()["moe"] == moe


def test_a_bank_computes_with_the_settings_its_bundles_were_trained_with(backbone):
    moe = {"rank": 8, "scale": 0.1, "top_k": 2, "dropout": 0.0, "noise_eps": 0.0}
    data = edit_bundle(random_bundle(empty_bank(backbone), "m", seed=3), manifest=lambda m: m.update(moe=moe))
    bank = build_bank(backbone, [read_bundle(data)])
    assert bank.config == MoEConfig(**moe)  # not the defaults (dropout 0.1, noise 0.01)
    other = edit_bundle(
        random_bundle(empty_bank(backbone), "n", seed=4),
        manifest=lambda m: (m["routing"].update(scale=0.2), m.update(moe={**moe, "scale": 0.2})),
    )
    with pytest.raises(BundleInvalid, match="scale=0.2"):  # a bank computes with one setting for every task
        build_bank(backbone, [read_bundle(other)], previous=bank)


def test_expert_ids_are_one_string_per_id_across_manifests(bundles):
    """A bank of n tasks names each expert in up to n routing tables: parsed ids are interned, not copied."""
    from model_store.bundle import read_manifest

    first, second = (read_manifest(bundles[t]) for t in ("textures", "glyphs"))
    shared = set(first.routing.blocks["visual"][0]) & set(second.routing.blocks["visual"][0])
    assert shared  # glyphs' router sees textures' experts
    eid = next(iter(shared))
    mine = next(i for i in first.routing.blocks["visual"][0] if i == eid)
    theirs = next(i for i in second.routing.blocks["visual"][0] if i == eid)
    assert mine is theirs


def test_the_index_keeps_only_accuracies_that_are_shares():
    """An outside check: a bundle whose manifest said val_accuracy 1e308 was listed by `clipbank tasks` as "inf%"."""
    from model_store.manifest import index_metrics

    assert index_metrics({"val_accuracy": 0.9, "zero_shot_val_accuracy": 0.2}) == {
        "val_accuracy": 0.9,
        "zero_shot_val_accuracy": 0.2,
    }
    assert index_metrics({"val_accuracy": 1e308, "zero_shot_val_accuracy": -0.5}) == {}
    # how many classes it had training images of: `tasks activate` warns when that is fewer than it answers
    assert index_metrics({"train_classes": 4}) == {"train_classes": 4.0}
    assert index_metrics({"train_classes": -1}) == {} and index_metrics({"train_classes": "4"}) == {}

"""The continual-learning benchmark's second round: known-concept domains, the adapter-ddas and wise-ft
baselines, expert activation, the class-incremental protocol, and seeds aggregated as mean ± std."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from clipbank.cli import main
from model_store.backbone import load_backbone
from model_store.bank import build_bank, empty_bank
from model_store.bundle import read_bundle
from training.cl_baselines import _WiseFT
from training.cl_common import BATCH_ROUTED, LABEL_ROUTED, cl_metrics
from training.cl_incremental import class_groups, run_class_incremental
from training.cl_seeds import SUMMARY_KEYS, aggregate, mean_tree, seed_configs, summary_of
from training.continual import CLConfig
from training.data import load_domain
from training.known_domains import KNOWN_CONCEPT
from training.trainer import TrainConfig, accuracy, train_task


@pytest.mark.parametrize("name", KNOWN_CONCEPT)
def test_known_concept_domains_sit_where_zero_shot_matters(backbone, name):
    """Between 40% and 90% zero-shot on the tiny backbone: Transfer on them can fail either way."""
    data = load_domain(name, "val")
    acc = accuracy(backbone.model, backbone, data, "a photo of a {}.", lambda n: None)
    chance = 1 / len(data.classes)
    assert 0.4 <= acc <= 0.9 and acc > 2.5 * chance, (name, acc)


def _two_tasks(backbone, **extra):
    bank, bundles = empty_bank(backbone), []
    for t, name in enumerate(("arrows", "digits")):
        train = load_domain(name, "train").subset(range(64))
        cfg = TrainConfig(task=name, steps=2, batch_size=8, seed=t, **extra)
        bundles.append(read_bundle(train_task(bank, train, cfg, load_domain(name, "val"), progress=False).bundle))
        bank = build_bank(backbone, bundles, previous=bank)
    return bank, bundles


def test_isolated_task_routes_only_to_its_own_adapter(backbone):
    """adapter-ddas: one rank-128 expert per block whose router sees nothing else, so its gate is always 1."""
    bank, (first, second) = _two_tasks(backbone, new_experts=1, rank=128, isolated=True)
    for bundle in (first, second):
        own = set(bundle.experts)
        for tower in ("visual", "text"):
            for ids, router in zip(bundle.manifest.routing.blocks[tower], bundle.routers[tower], strict=True):
                assert len(ids) == 1 and ids[0] in own and router.shape[0] == 1
    assert not second.uses  # nothing of the first task's
    assert {p.expert.down_w.shape[0] for p in second.experts.values()} == {128}
    with pytest.raises(ValueError, match="isolated"):
        TrainConfig(task="x", isolated=True, warm_start_steps=1)


def test_wise_ft_interpolates_each_weight_between_zero_shot_and_tuned():
    zero = torch.nn.Linear(3, 2)
    tuned = torch.nn.Linear(3, 2)
    wise = _WiseFT(zero, 0.25)
    mixed = wise.mixed(tuned)
    assert torch.allclose(mixed.weight, 0.75 * zero.weight + 0.25 * tuned.weight)
    assert torch.allclose(mixed.bias, 0.75 * zero.bias + 0.25 * tuned.bias)
    assert not torch.equal(zero.weight, mixed.weight)  # the zero-shot model itself is left alone
    with pytest.raises(ValueError, match="wise_alpha"):
        CLConfig(wise_alpha=0.0)


def test_learned_is_the_diagonal():
    assert cl_metrics([[0.5, 0.2], [0.4, 0.9]])["learned"] == pytest.approx(70.0)


def _report(seed: int, ddas: float, oracle: float, finetune_learned: float) -> dict:
    row = [[0.5, 0.6], [0.5, 0.7]]

    def m(last: float, learned: float) -> dict:
        return {"matrix": row, "transfer": 60.0, "avg": 55.0, "last": last, "forgetting": 0.0, "learned": learned}

    return {
        "config": {"seed": seed},
        "domains": ["sketches", "colours"],
        "outside": "shapes",
        "methods": {
            "zero-shot": {**m(50.0, 50.0), "matrix": [[0.5, 0.5], [0.5, 0.5]]},
            "finetune": m(40.0, finetune_learned),
            "moe-oracle": m(oracle, 80.0),
            "moe-ddas": m(ddas, 79.0),
            "adapter-ddas": m(ddas - 2, 78.0),
            "moe-ddas-labels": m(oracle - 0.25, 79.5),
        },
        "routing": {"task_accuracy": 0.98, "zero_shot_fallback": 0.99, "near_ood": {"a": 0.95, "b": 0.9},
                    "long": {"task_accuracy": 0.97}, "near_ood_labels": {"a": 1.0, "b": 0.96},
                    "long_labels": {"task_accuracy": 0.975}},
        "routing_by_method": {"moe-ddas-labels": {"zero_shot_fallback": 0.995}},
        "class_incremental": {"old_class_accuracy_last": 40.0 + seed / 1000, "forgetting": 10.0, "versions": [1, 2]},
        "outside_accuracy": {"moe-ddas": 95.0, "zero-shot": 99.0},
        "task_agnostic": {"moe-ddas": {"per_domain": {"sketches": ddas, "colours": ddas}, "mean": ddas}},
        "seconds": {"total": 10.0},
    }  # fmt: skip


def test_summary_of_one_seed():
    s = summary_of(_report(0, 80.0, 81.0, 90.0))
    assert set(s) == set(SUMMARY_KEYS)
    assert s["transfer_known_vs_zero_shot"] == pytest.approx(60.0 - 50.0)  # colours is column 1: 0.6 vs 0.5
    assert s["last_ddas_vs_oracle"] == pytest.approx(-1.0)
    assert s["plasticity_gap_vs_finetune"] == pytest.approx(10.0)
    assert s["last_ddas_vs_adapter_ddas"] == pytest.approx(2.0)
    assert s["fallback_near_min"] == 0.9 and s["fallback_pretraining"] == 0.99
    assert s["routing_long_task_accuracy"] == 0.97 and s["cil_old_class_accuracy_last"] == 40.0
    assert s["outside_accuracy_vs_zero_shot"] == pytest.approx(-4.0) and s["task_agnostic_ddas"] == 80.0
    # the same figures as served (labels matched), each from its own field, never the selectors-alone ones
    assert s["last_labels_vs_oracle"] == pytest.approx(-0.25) and s["routing_long_task_accuracy_labels"] == 0.975
    assert s["fallback_pretraining_labels"] == 0.995 and s["fallback_near_min_labels"] == 0.96


def test_seeds_aggregate_as_mean_and_std():
    reports = [_report(0, 80.0, 81.0, 90.0), _report(1000, 82.0, 82.0, 92.0), _report(2000, 84.0, 83.0, 94.0)]
    out = aggregate(reports)
    assert out["seeds"] == [0, 1000, 2000]
    ddas = out["methods"]["moe-ddas"]
    assert ddas["last"] == pytest.approx(82.0) and ddas["last_std"] == pytest.approx(2.0)
    s = out["summary"]
    assert s["last_ddas_vs_oracle"] == pytest.approx(0.0) and s["last_ddas_vs_oracle_std"] == pytest.approx(1.0)
    assert s["plasticity_gap_vs_finetune"] == pytest.approx(12.0)
    assert s["cil_old_class_accuracy_last"] == pytest.approx(41.0)
    assert out["class_incremental"]["versions"] == [1, 2]  # equal values keep their type
    agnostic = out["task_agnostic"]["moe-ddas"]
    assert agnostic["mean"] == pytest.approx(82.0) and agnostic["mean_std"] == pytest.approx(2.0)
    assert reports[0]["task_agnostic"]["moe-ddas"] == {"per_domain": {"sketches": 80.0, "colours": 80.0}, "mean": 80.0}
    assert [p["seed"] for p in out["per_seed"]] == [0, 1000, 2000]
    assert out["seconds"]["all_seeds"] == 30.0
    goals = out["goals"]  # computed, so the benchmark can say it failed (the docs' tables were by hand)
    assert goals["last_ddas_vs_oracle"] == {"value": pytest.approx(0.0), "std": 1.0, "goal": ">= -1", "met": True}
    assert goals["plasticity_gap_vs_finetune"]["met"] is False and goals["plasticity_gap_vs_finetune"]["goal"] == "<= 3"
    assert goals["fallback_near_min"]["met"] is True and goals["routing_long_task_accuracy"]["met"] is True
    json.dumps(out)  # the report stays JSON


def test_mean_tree_and_seed_configs():
    assert mean_tree([{"a": [1.0, 2.0], "b": "x"}, {"a": [3.0, 4.0], "b": "y"}]) == {"a": [2.0, 3.0], "b": "x"}
    assert mean_tree([{"a": 1.0, "only": 5.0}, {"a": 3.0}]) == {"a": 2.0, "only": 5.0}
    cfgs = seed_configs(CLConfig(seed=7, expert_blocks_sweep=(1,)), 3)
    assert [c.seed for c in cfgs] == [7, 1007, 2007]
    assert cfgs[0].expert_blocks_sweep == (1,) and cfgs[1].expert_blocks_sweep == () and not cfgs[2].int8
    with pytest.raises(ValueError, match="seeds"):
        seed_configs(CLConfig(), 0)


def test_union_of_classes_counts_a_shared_name_once():
    from training.cl_agnostic import union_classes
    from training.continual import offline_sequence

    seq = offline_sequence(("sketches", "colours", "zoomed"), train_limit=2, test_limit=8)
    union = union_classes(seq)
    assert union[:8] == seq[0].classes and len(union) == len(set(union)) == 16  # zoomed: sketches' shape names
    relabelled = seq[2].test.with_classes(union)
    assert [union[y] for y in relabelled.labels] == [seq[2].classes[y] for y in seq[2].test.labels]


def test_class_groups():
    assert class_groups(tuple("abcdefghij"), 3) == [tuple("abcd"), tuple("efg"), tuple("hij")]
    with pytest.raises(ValueError, match="versions"):
        class_groups(("a", "b", "c"), 3)


def test_class_incremental_protocol(backbone):
    r = run_class_incremental(backbone, CLConfig(steps=2, batch_size=8), train_limit=120, test_limit=90, progress=False)
    assert [v["version"] for v in r["versions"]] == [1, 2, 3]
    assert [len(v["classes"]) for v in r["versions"]] == [4, 7, 10]
    last = r["versions"][-1]
    n = last["test_images_per_group"]
    assert len(n) == 3 and sum(n) == 90
    old = np.average(last["pinned"][:2], weights=n[:2])
    assert r["old_class_accuracy_last"] == pytest.approx(100 * old, abs=0.01)
    drops = [r["versions"][g]["pinned"][g] - last["pinned"][g] for g in range(2)]
    assert r["forgetting"] == pytest.approx(100 * max(drops), abs=0.01)
    assert r["versions"][0]["old_class_accuracy_pinned"] is None


def test_bench_cl_refuses_bad_settings_before_any_work(capsys, tmp_path):
    assert main(["bench", "cl", "--seeds", "0"]) != 0
    assert "seeds must be >= 1, got 0" in capsys.readouterr().err
    out = tmp_path / "made" / "report"  # a check after the --out folder was made: it is not left behind empty
    assert main(["bench", "cl", "--methods", "zero-shot,moe-dds", "--out", str(out)]) == 2
    assert "moe-dds" in capsys.readouterr().err and not (tmp_path / "made").exists()  # nor its parent made for it
    (tmp_path / "kept").mkdir()  # a folder that was there before stays
    assert main(["bench", "cl", "--methods", "zero-shot,moe-dds", "--out", str(tmp_path / "kept")]) == 2
    assert (tmp_path / "kept").is_dir()


def test_bench_cl_with_seeds_writes_mean_and_std(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLIPBANK_ONNX_CACHE", str(tmp_path / "onnx"))  # the int8 comparison's export
    out = tmp_path / "cl"
    args = ["bench", "cl", "--quick", "--domains", "arrows,colours", "--steps", "2", "--test-limit", "24"]
    args += ["--seeds", "2"]
    args += ["--methods", "zero-shot,moe-oracle,moe-ddas,adapter-ddas", "--expert-blocks", "", "--no-routing"]
    args += ["--no-class-incremental", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"] == [0, 1000] and len(report["per_seed"]) == 2
    assert {"last", "last_std", "learned", "learned_std"} <= set(report["methods"]["moe-ddas"])
    s = report["summary"]
    assert s["last_ddas_vs_oracle"] is not None and s["last_ddas_vs_adapter_ddas_std"] is not None
    assert s["transfer_known_vs_zero_shot"] is not None  # colours comes second: its Transfer is measured
    assert s["cil_old_class_accuracy_last"] is None and s["routing_long_task_accuracy"] is None
    goals = report["goals"]
    assert goals["routing_long_task_accuracy"]["met"] is None  # --no-routing: not measured, not a pass
    judged = {k: g["met"] for k, g in goals.items() if g["value"] is not None}
    assert judged and set(judged.values()) == {None}, judged  # measured, but not at the default run's sizes
    assert goals["wall_minutes"]["goal"] == "<= 5" and goals["wall_minutes"]["value"] >= 0
    assert goals["wall_minutes"]["met"] is None  # not the quick run's sizes: not judged
    assert "| holds on the mean |" in (out / "report.md").read_text()
    facts = report["machine_facts"]  # reports named no CPU model
    assert facts["logical_cpus"] >= 1 and facts["python"] and report["machine"].startswith(facts["cpu"])
    assert f"Machine: {report['machine']}." in (out / "report.md").read_text()
    assert "not judged (other run sizes) | `seconds.wall` |" in (out / "report.md").read_text()
    shares = report["expert_activation"]
    assert shares["adapter-ddas"]["colours"]["colours"] == 1.0  # isolated: only its own expert
    assert shares["moe-ddas"]["arrows"] == {"arrows": 1.0}  # the first task has nothing older to pick
    assert sum(shares["moe-ddas"]["colours"].values()) == pytest.approx(1.0, abs=1e-3)
    assert {"moe-ddas", "adapter-ddas", "zero-shot"} <= set(report["outside_accuracy"])
    md = (out / "report.md").read_text()
    assert "Summary over 2 seeds" in md and " ± " in md and "Expert activation" in md and "Task-agnostic" in md
    assert set(report["task_agnostic"]) == {"zero-shot", "moe-oracle", "moe-ddas", "adapter-ddas"}


def test_parent_teacher_is_zero_on_the_parents_own_answers(backbone):
    """LwF for a new version: the KL to the parent's answers over the old classes, nothing for the new ones."""
    from model_store.moe_clip import encode_image
    from training.lwf import ParentTeacher, parent_teacher

    data = load_domain("digits", "train").subset(range(48))
    v1 = train_task(empty_bank(backbone), data, TrainConfig(task="digits", steps=2, batch_size=8), progress=False)
    bank = build_bank(backbone, [read_bundle(v1.bundle)])
    classes = (*data.classes, "eleven")  # the new version's: the parent's first
    teacher = parent_teacher(bank, "digits", classes, 1.0)
    x = torch.stack([backbone.preprocess(im) for im in data.images[:6]])
    with torch.no_grad():
        img = encode_image(backbone.model, x, teacher._routing(len(x)))
    parents = backbone.model.logit_scale.exp() * img @ teacher.text.T
    own = torch.cat([parents, torch.full((6, 1), 5.0)], dim=1)  # any logit for the new class
    assert teacher.loss(x, own).item() == pytest.approx(0.0, abs=1e-5)
    assert teacher.loss(x, torch.randn(6, len(classes)) * 5).item() > 0.01
    assert parent_teacher(bank, "other", classes, 1.0) is None and parent_teacher(bank, "digits", classes, 0) is None
    with pytest.raises(ValueError, match="lacks the parent's classes"):
        ParentTeacher(bank, "digits", classes[1:], 1.0)
    with pytest.raises(ValueError, match="distill"):
        TrainConfig(task="x", distill=-1)


def test_bench_cl_figures_do_not_depend_on_the_workers(tmp_path):
    """The seeds' parts run side by side in worker processes and merge into the same report, figure for figure,
    as when they run one after the other in this process (both on one compute thread: the same float rounding)."""
    from training.cl_job import run_offline_cl
    from training.config import CLJob

    job = dict(quick=True, domains="arrows,colours", steps=2, test_limit=24, seeds=2, routing=False)
    job |= dict(methods="zero-shot,moe-oracle,moe-ddas,finetune", class_incremental=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = run_offline_cl(CLJob(**job, workers=1), load_backbone("tiny", "cpu"), progress=False)
    finally:
        torch.set_num_threads(threads)
    side_by_side = run_offline_cl(CLJob(**job, workers=2), load_backbone("tiny", "cpu"), progress=False)
    assert set(alone["methods"]) == {"zero-shot", "moe-oracle", "moe-ddas", "finetune", LABEL_ROUTED, BATCH_ROUTED}
    for key in ("methods", "summary", "routing", "outside_accuracy", "task_agnostic", "per_seed"):
        assert _without_seconds(side_by_side[key]) == _without_seconds(alone[key]), key
    assert alone["seeds"] == side_by_side["seeds"] == [0, 1000]


def _without_seconds(tree):
    if isinstance(tree, dict):
        return {k: _without_seconds(v) for k, v in tree.items() if k != "seconds"}
    return [_without_seconds(v) for v in tree] if isinstance(tree, list) else tree


def test_parts_of_the_seeds_and_their_merge():
    from training.cl_parallel import merge_reports, plan_parts

    cfg = CLConfig(expert_blocks_sweep=(2,), int8=True)
    parts = plan_parts(seed_configs(cfg, 3), routing=True, class_incremental=True)
    assert len(parts) == 15 and [p.name for p in parts[:3]] == ["moe"] * 3  # the costliest first
    by = {(p.seed_index, p.name): p.cfg for p in parts}
    assert by[(0, "moe")].int8 and by[(0, "moe")].expert_blocks_sweep == (2,)  # reported once, with the MoE bank
    assert (
        not by[(1, "moe")].int8 and not by[(0, "sequential")].int8 and by[(0, "adapter-ddas")].expert_blocks_sweep == ()
    )
    assert by[(0, "sequential")].methods == ("zero-shot", "finetune", "wise-ft")
    assert by[(2, "routing")].seed == 2000 and by[(2, "cil")] == seed_configs(cfg, 3)[2]
    only = plan_parts([CLConfig(methods=("finetune",))], routing=False, class_incremental=False)
    assert [(p.name, p.cfg.methods) for p in only] == [("sequential", ("finetune",))]

    moe = {
        "methods": {"moe-ddas": 1},
        "routing": {"task_accuracy": 0.8},
        "int8": {"x": 1},
        "seconds": {"moe-ddas": 5, "total": 6},
    }
    seq = {"methods": {"finetune": 2}, "routing": {}, "int8": None, "seconds": {"finetune": 3, "total": 4}}
    merged = merge_reports([moe, seq], cfg)
    assert merged["methods"] == {"moe-ddas": 1, "finetune": 2} and merged["routing"] == {"task_accuracy": 0.8}
    assert merged["int8"] == {"x": 1} and merged["seconds"] == {"moe-ddas": 5, "finetune": 3}  # the total: cl_job's
    assert merged["config"]["expert_blocks_sweep"] == (2,)  # the seed's own config, not a part's


def test_workers_one_on_a_gpu_even_when_auto_picked_it_and_for_random_weights():
    from types import SimpleNamespace

    from training.cl_parallel import MAX_WORKERS, workers_for

    def bb(device: str, weights: str | None = "tiny.safetensors"):
        return SimpleNamespace(device=torch.device(device), ref=SimpleNamespace(weights=weights))

    cores = len(os.sched_getaffinity(0))
    assert workers_for(None, bb("cpu")) == max(1, min(MAX_WORKERS, cores))
    assert workers_for(None, bb("cuda:0")) == 1  # what --device auto resolves to on a GPU host
    assert workers_for(3, bb("cpu")) == 3
    assert workers_for(3, bb("cpu", weights=None)) == 1


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"domains": "sketches,nosuch"}, "unknown domain\\(s\\) 'nosuch'; known: "),
        ({"outside": "nosuch"}, "unknown domain\\(s\\) 'nosuch'"),
        ({"domains": "sketches"}, "needs at least 2 domains, got 1"),
        ({"methods": "zero-shot"}, "zero-shot is what the methods are compared with"),
    ],
)
def test_bench_cl_refuses_at_once_what_failed_after_the_run(tmp_path, kw, message):
    """An unknown domain failed after 75 s of work, an --out that is a file after the whole run (its results lost),
    and `--methods zero-shot` alone with a KeyError (an outside check of the benchmarks)."""
    from training.config import CLJob

    with pytest.raises(ValueError, match=message):
        CLJob(**kw)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file; the report goes into a folder"):
        CLJob(out=str(tmp_path / "afile"))


def test_one_seed_has_no_spread_rather_than_a_spread_of_zero():
    out = aggregate([_report(0, 80.0, 81.0, 90.0)])
    assert out["methods"]["moe-ddas"]["last"] == pytest.approx(80.0)
    assert out["methods"]["moe-ddas"]["last_std"] is None
    s = out["summary"]
    assert s["last_ddas_vs_oracle"] == pytest.approx(-1.0) and s["last_ddas_vs_oracle_std"] is None
    assert out["task_agnostic"]["moe-ddas"]["mean_std"] is None


def _part_that_sleeps_or_fails(part, backbone):
    if part.name == "routing":
        raise ValueError("this part failed")
    time.sleep(120)  # a long part: the run must not wait for it once another failed or Ctrl-C came


def test_a_failed_or_interrupted_run_stops_its_workers_at_once(backbone):
    """An outside check's: Ctrl-C on `bench cl` said "interrupted" and the workers trained on, for an hour."""
    from training.cl_common import CLConfig
    from training.cl_parallel import Part, run_parts

    parts = [Part(0, "routing", CLConfig()), Part(0, "moe", CLConfig()), Part(0, "sequential", CLConfig())]
    start = time.monotonic()
    with pytest.raises(ValueError, match="this part failed"):
        run_parts(parts, _part_that_sleeps_or_fails, backbone, "cpu", workers=2, progress=False)
    assert time.monotonic() - start < 90  # not the 120 s of the part running beside it, nor the queued one


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cl", "--domains", "sketches,sketches"], "--domains: sketches named twice"),
        (["cl", "--domains", "sketches,shapes"], "--outside shapes is also learned"),
        (["routing", "--out", "/proc/clipbank-test"], "--out: cannot make or write in /proc/clipbank-test"),
    ],
)
def test_bench_settings_that_started_a_run_or_lost_its_report_are_refused_first(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_trailing_comma_in_a_list_flag_is_no_name():
    """An outside check: `--methods zero-shot,moe-ddas,` was refused as "invalid CLConfig: unknown methods ['']"."""
    from training.cl_common import comma_names
    from training.cl_job import cl_config
    from training.config import CLJob

    assert comma_names("zero-shot, moe-ddas,") == ("zero-shot", "moe-ddas") and comma_names(None) == ()
    assert cl_config(CLJob(quick=True, methods="zero-shot,moe-ddas,")).methods == ("zero-shot", "moe-ddas")
    with pytest.raises(ValueError, match=r"^invalid settings: unknown methods \['bogus'\]"):
        cl_config(CLJob(quick=True, methods="bogus,"))


def test_a_new_version_trained_from_python_keeps_its_parents_classes(backbone, caplog):
    """An outside check's notebook: `train_task(bank, new_classes_only, cfg, version=2, parent=v1)` packed a
    version answering over the new classes alone, and nothing warned; `clipbank train --store` answers over every
    class seen so far. A version 1 of a task the bank serves trained in full before its store refused it."""
    from training.cl_incremental import _only

    data = load_domain("digits", "train")
    old, new = data.classes[:3], data.classes[3:5]
    cfg = TrainConfig(task="digits", steps=2, batch_size=8)
    v1 = read_bundle(train_task(empty_bank(backbone), _only(data, old).subset(range(24)), cfg, progress=False).bundle)
    bank = build_bank(backbone, [v1])
    with caplog.at_level("WARNING"):
        v2 = train_task(bank, _only(data, new).subset(range(16)), cfg, version=2, parent=v1.id, progress=False)
    assert read_bundle(v2.bundle).manifest.classes == (*old, *new) == tuple(v2.report["classes"])
    assert any("no images of 3 of the parent's classes" in w for w in v2.report["warnings"]), v2.report["warnings"]
    assert "no images of 3 of the parent's classes" in caplog.text
    with pytest.raises(ValueError, match="already serves task 'digits'.*version=<the store's newest"):
        train_task(bank, _only(data, new).subset(range(16)), cfg, progress=False)
    with caplog.at_level("WARNING"):  # a later version that names no parent
        v3 = train_task(bank, _only(data, new).subset(range(16)), cfg, version=3, progress=False)
    assert v3.report["classes"] == list(new) and "names no parent" in v3.report["warnings"][0]
    with pytest.raises(ValueError, match="not task 'digits'.s bundle in the bank"):
        train_task(bank, _only(data, new).subset(range(16)), cfg, version=2, parent="f" * 64, progress=False)

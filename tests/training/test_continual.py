"""The continual-learning benchmark: metrics by hand, a tiny offline run end to end, and the real-protocol
harness on generated stand-in folders (the real datasets never reach this machine)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clipbank.cli import main
from training.continual import (
    BATCH_ROUTED,
    LABEL_ROUTED,
    METHODS,
    CLConfig,
    cl_metrics,
    offline_sequence,
    run_continual,
)
from training.data import load_domain
from training.protocols import MTIL_ORDER_I, MTIL_ORDER_II, class_order


def test_metrics_match_their_definitions():
    a = [[0.5, 0.2, 0.1], [0.4, 0.9, 0.3], [0.45, 0.6, 0.8]]
    m = cl_metrics(a)
    assert m["transfer"] == pytest.approx(100 * np.mean([0.2, np.mean([0.1, 0.3])]))
    assert m["avg"] == pytest.approx(100 * np.mean(a), abs=0.01)
    assert m["last"] == pytest.approx(100 * np.mean([0.45, 0.6, 0.8]), abs=0.01)
    assert m["forgetting"] == pytest.approx(30.0)  # task 1: best 0.9, final 0.6


def test_orders_hold_the_same_eleven_datasets():
    assert len(MTIL_ORDER_I) == 11 and sorted(MTIL_ORDER_I) == sorted(MTIL_ORDER_II)
    assert sorted(class_order(100)) == list(range(100))
    assert class_order(100)[:10] == [87, 0, 52, 58, 44, 91, 68, 97, 51, 15]  # MoE-Adapters4CL's cifar100.yaml
    assert class_order(100)[-3:] == [26, 35, 39]
    assert sorted(class_order(10)) == list(range(10))  # other class counts: a fixed permutation


@pytest.fixture(scope="module")
def tiny_run(backbone, tmp_path_factory):
    seq = offline_sequence(("arrows", "digits"), train_limit=64, test_limit=24)
    outside = load_domain("shapes", "test").subset(range(24))
    cfg = CLConfig(steps=3, batch_size=16, methods=METHODS, expert_blocks_sweep=(1,))
    with pytest.MonkeyPatch.context() as mp:  # the int8 comparison's ONNX export
        mp.setenv("CLIPBANK_ONNX_CACHE", str(tmp_path_factory.mktemp("onnx")))
        return run_continual(backbone, seq, cfg, outside, "shapes", progress=False)


def test_int8_frozen_pass_is_compared_with_the_float_one(tiny_run):
    int8 = tiny_run["int8"]
    if "error" in int8:
        pytest.importorskip("onnxruntime")
        pytest.fail(int8["error"])
    assert set(int8["fp32"]) == set(int8["int8"]) == {"zero_shot", "auto", "routing", "outside_fallback"}
    for k, d in int8["delta_points"].items():
        assert d == pytest.approx(int8["int8"][k] - int8["fp32"][k], abs=0.011)
        assert abs(d) <= 10, (k, d)  # 48 test images: a few answers at most may change
    zero_shot = tiny_run["methods"]["zero-shot"]["matrix"][-1]  # the same plain CLIP, by the serving path
    assert int8["fp32"]["zero_shot"] == pytest.approx(100 * sum(zero_shot) / len(zero_shot), abs=0.01)


def test_report_has_every_method_and_routing(tiny_run):
    assert tiny_run["domains"] == ["arrows", "digits"]
    assert set(tiny_run["methods"]) == {*METHODS, BATCH_ROUTED, LABEL_ROUTED, "moe-oracle-k1", "moe-ddas-k1"}
    for r in tiny_run["methods"].values():
        assert np.asarray(r["matrix"]).shape == (2, 2)
        assert {"transfer", "avg", "last", "forgetting"} <= set(r)
    routing = tiny_run["routing"]
    assert 0 <= routing["task_accuracy"] <= 1 and 0 <= routing["zero_shot_fallback"] <= 1
    assert set(routing["per_domain"]) == {"arrows", "digits", "shapes"}
    for fractions in routing["per_domain"].values():
        assert sum(fractions.values()) == pytest.approx(1.0)


def test_label_routed_rows_leave_images_of_labels_no_task_knows_to_zero_shot(tiny_run):
    """arrows, digits and shapes share no label: as served with their own labels, digits before it is learned
    and every shapes image go to zero-shot CLIP, and each task's images reach no other task."""
    served, zero_shot = tiny_run["methods"][LABEL_ROUTED]["matrix"], tiny_run["methods"]["zero-shot"]["matrix"]
    assert served[0][1] == zero_shot[0][1]  # Transfer is zero-shot's exactly
    per_domain = tiny_run["routing_by_method"][LABEL_ROUTED]["per_domain"]
    assert per_domain["shapes"] == {"zero-shot": 1.0}
    assert set(per_domain["arrows"]) <= {"arrows", "zero-shot"} and set(per_domain["digits"]) <= {"digits", "zero-shot"}
    alone = tiny_run["routing_by_method"]["moe-ddas"]["per_domain"]
    for d in ("arrows", "digits"):  # a task's own images can only gain when other tasks may not claim them
        assert per_domain[d].get(d, 0) >= alone[d].get(d, 0)


def test_task_agnostic_scores_every_image_over_the_union_of_classes(tiny_run):
    """Over more labels an image can only lose: each method's accuracy over the union of the classes of arrows
    and digits is at most its Last on the image's own task's labels, domain by domain."""
    agnostic = tiny_run["task_agnostic"]
    assert set(agnostic) == set(METHODS)  # every method the run made, the oracle pinned over the union too
    for method, row in agnostic.items():
        last = tiny_run["methods"][method]["matrix"][-1]
        for i, d in enumerate(tiny_run["domains"]):
            assert row["per_domain"][d] <= 100 * last[i] + 0.005, (method, d)  # rounded to 2 decimals
        assert row["mean"] == pytest.approx(np.mean(list(row["per_domain"].values())), abs=0.01)
    drops = [
        100 * tiny_run["methods"][m]["matrix"][-1][i] - row["per_domain"][d]
        for m, row in agnostic.items()
        for i, d in enumerate(tiny_run["domains"])
    ]
    assert max(drops) > 1, drops  # 18 labels are harder than 8 or 10: somewhere the union costs answers


def test_moe_never_forgets_and_oracle_sends_unseen_tasks_to_zero_shot(tiny_run):
    oracle = tiny_run["methods"]["moe-oracle"]["matrix"]
    assert oracle[0][0] == oracle[1][0]  # published experts never change: bit-identical answers
    assert oracle[0][1] == tiny_run["methods"]["zero-shot"]["matrix"][0][1]
    assert tiny_run["methods"]["moe-oracle"]["forgetting"] == 0.0


def test_each_k_of_the_sweep_trains_its_own_bank(tiny_run, backbone):
    from training.expert_blocks import default_expert_blocks

    rows = tiny_run["expert_blocks"]
    default = default_expert_blocks(backbone) or 4
    assert [(r["expert_blocks"], r["of_layers"]) for r in rows] == [(default, 4), (1, 4)]  # the default bank first
    k1 = tiny_run["methods"]["moe-oracle-k1"]
    assert rows[1]["oracle_last"] == k1["last"] and rows[1]["train_seconds"] > 0
    assert k1["matrix"] != tiny_run["methods"]["moe-oracle"]["matrix"]  # another bank, other answers
    assert k1["matrix"][0][1] == tiny_run["methods"]["zero-shot"]["matrix"][0][1]  # unseen: zero-shot


def test_report_files(tiny_run, tmp_path):
    from training.cl_report import write_cl_report

    paths = write_cl_report(tiny_run, tmp_path, "clipbank bench cl --test")
    assert {p.name for p in paths} == {
        "report.json", "report.md", "accuracy_matrices.png", "accuracy_over_time.png", "routing.png",
    }  # fmt: skip
    for p in paths:
        assert p.stat().st_size > 100
    assert json.loads((tmp_path / "report.json").read_text())["domains"] == ["arrows", "digits"]
    md = (tmp_path / "report.md").read_text()
    assert "| `moe-ddas` |" in md and "task_accuracy" in md and "| 1 of 4 |" in md


def test_report_with_the_long_routing_sequence(tiny_run, tmp_path, backbone):
    """`clipbank bench cl` adds the routing benchmark's keys (here on a short sequence) to its report."""
    from model_store.reference import find_reference
    from training.cl_report import write_cl_report
    from training.routing import RoutingConfig, run_routing
    from training.routing_report import routing_keys

    cfg = RoutingConfig(kinds=("autoencoder", "gaussian"), sequence=("digits", "arrows"), near=("glyphs-other",))
    long = routing_keys(run_routing(backbone, find_reference(backbone), cfg), "autoencoder")
    report = {**tiny_run, "routing": {**tiny_run["routing"], **long}}
    paths = write_cl_report(report, tmp_path, "clipbank bench cl --test")
    assert "routing_long.png" in {p.name for p in paths}
    saved = json.loads((tmp_path / "report.json").read_text())["routing"]
    assert set(saved["near_ood"]) == {"glyphs-other"} and set(saved["kinds"]) == {"autoencoder", "gaussian"}
    assert 0 <= saved["long"]["task_accuracy"] <= 1 and 0 <= saved["long"]["zero_shot_fallback"] <= 1
    for kind in ("autoencoder", "gaussian"):
        assert set(saved["kinds"][kind]["near_ood"]) == {"glyphs-other"}
        assert {"task_accuracy", "zero_shot_fallback"} <= set(saved["kinds"][kind]["long"])
    assert saved["per_domain"] == tiny_run["routing"]["per_domain"]  # the CL run's own routing stays
    md = (tmp_path / "report.md").read_text()
    assert "## Routing: the long sequence (as `bench routing`)" in md and "Command: `clipbank bench cl --test`" in md
    assert "Plots: [`accuracy_matrices.png`]" in md and "[`routing_long.png`](routing_long.png)" in md


def _stand_in(root, name: str, classes: int, per_class: int = 3) -> None:
    rng = np.random.default_rng(len(name))
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / name / split / f"{name}_class_{c}"
            folder.mkdir(parents=True)
            for k in range(per_class):
                colour = tuple(int(v) for v in rng.integers(0, 256, 3))
                Image.new("RGB", (24 + k, 20), colour).save(folder / f"{k}.png")


def _mnist_raw(root, n: int = 8) -> None:
    """MNIST in torchvision's raw idx format, so the torchvision path (download=False) is exercised too."""
    import struct

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        pixels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + pixels.tobytes())
        labels = np.array([i % 2 for i in range(n)], dtype=np.uint8)
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def test_few_shot_mtil_trains_on_n_images_per_class_and_validates_on_others(tmp_path):
    from training.protocols import few_shot, mtil_sequence

    for name in MTIL_ORDER_I:
        if name == "mnist":
            _mnist_raw(tmp_path / "data", n=24)
        else:
            _stand_in(tmp_path / "data", name, 3, per_class=8)
    seq = mtil_sequence(tmp_path / "data", "mtil-1", shots=5)
    assert [d.name for d in seq] == list(MTIL_ORDER_I)
    for d in seq:
        counts = np.bincount(d.train.labels, minlength=len(d.classes))
        present = np.bincount(d.test.labels, minlength=len(d.classes)) > 0  # the MNIST stand-in has 2 of 10 digits
        assert counts[present].tolist() == [5] * int(present.sum()), d.name  # 5 shots of every class
        assert len(d.val) > 0 and set(d.train.images.sources).isdisjoint(d.val.images.sources), d.name
    sketch = seq[0]
    assert len(sketch.test) == 3 * 8  # the test split stays whole
    data = load_domain("arrows", "train").subset(range(64))
    fit, val = few_shot(data, 2, seed=1)
    assert np.bincount(fit.labels).max() == 2 and len(val) == len(fit)
    assert not {id(im) for im in fit.images} & {id(im) for im in val.images}  # never the same image twice
    assert few_shot(data, 2, seed=1)[0].labels == fit.labels  # seeded
    with pytest.raises(ValueError, match="shots"):
        few_shot(data, 0)


def test_shots_outside_few_shot_mtil_are_refused(capsys):
    assert main(["bench", "cl", "--shots", "5"]) == 2
    assert "--shots is for few-shot MTIL" in capsys.readouterr().err
    assert main(["bench", "cl", "--protocol", "cifar100-10", "--data-root", "/nonexistent", "--shots", "5"]) == 2
    assert "not CIFAR-100" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["mtil-1", "cifar100-10"])
def test_protocol_dry_run_on_stand_in_folders(tmp_path, protocol, capsys):
    for name in MTIL_ORDER_I:
        if name == "mnist":
            _mnist_raw(tmp_path / "data")
        else:
            _stand_in(tmp_path / "data", name, 20 if name == "cifar100" else 2)
    args = ["bench", "cl", "--protocol", protocol, "--data-root", str(tmp_path / "data"), "--limit", "2"]
    args += ["--steps", "2", "--methods", "zero-shot,moe-ddas,finetune", "--backbone", "tiny"]
    args += ["--out", str(tmp_path / "out")]
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["protocol"] == protocol
    if protocol == "mtil-1":
        assert report["domains"] == list(MTIL_ORDER_I)
        assert np.asarray(report["methods"]["moe-ddas"]["matrix"]).shape == (11, 11)
        # the papers' prompts (training/prompts.py): torchvision's MNIST names cleaned, each dataset's ensemble
        assert report["prompts"].startswith("papers (clip_benchmark 1.6.2")
        assert report["classes"]["mnist"][:2] == ["0", "1"]  # read through torchvision, then cleaned
        assert report["classes"]["dtd"] == ["dtd class 0", "dtd class 1"]  # folder names stay
        assert report["templates"]["mnist"] == ['a photo of the number: "{}".']
        assert len(report["templates"]["caltech101"]) == 34 and "a photo of a {}." in report["templates"]["cars"]
    else:
        assert report["prompts"] == "a bad photo of a {}."  # MoE-Adapters' CIFAR-100 prompt
        assert [s["classes"] for s in report["steps"]] == list(range(2, 21, 2))
        assert 0 <= report["last"] <= 100 and 0 <= report["avg"] <= 100
        assert "| 10 | 20 |" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--protocol", "mtil-1", "--data-root", "{tmp}", "--limit", "0"], "--limit must be >= 2"),
        (["--protocol", "mtil-1", "--data-root", "{tmp}/none"], "not found; it must be the folder"),
        (["--protocol", "mtil-1"], "needs --data-root"),
        (["--data-root", "{tmp}"], "--data-root is for the real protocols"),
        (["--limit", "5"], "--limit is for the real protocols"),
        (["--seed", "-1"], "--seed must be in 0 .."),
    ],
)
def test_bench_cl_settings_refused_before_any_work(tmp_path, extra, message, monkeypatch, capsys):
    """Each used to start work: a backbone load (a minute for ViT-B-16) or a whole offline run, then fail or
    ignore the flag (`--limit 0` kept no image, `--seed -1` failed in NumPy's first generator)."""
    import model_store.backbone

    monkeypatch.setattr(model_store.backbone, "load_backbone", lambda *a, **k: pytest.fail("a backbone was loaded"))
    assert main(["bench", "cl", *[a.replace("{tmp}", str(tmp_path)) for a in extra], "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_dataset_is_said_before_the_backbone_loads(tmp_path, monkeypatch, capsys):
    import model_store.backbone

    monkeypatch.setattr(model_store.backbone, "load_backbone", lambda *a, **k: pytest.fail("a backbone was loaded"))
    for protocol in ("mtil-1", "cifar100-10"):
        assert main(["bench", "cl", "--protocol", protocol, "--data-root", str(tmp_path), "--prompts", "plain"]) == 2
        assert f"{protocol.split('-')[0] if protocol != 'mtil-1' else 'aircraft'}: neither" in capsys.readouterr().err


def test_limit_below_two_is_refused(tmp_path):
    from training.protocols import load_dataset

    with pytest.raises(ValueError, match="--limit must be >= 2"):
        load_dataset(tmp_path, "dtd", limit=1)

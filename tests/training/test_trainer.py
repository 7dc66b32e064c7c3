"""Training on offline domains: accuracy lift, routing, and that training B leaves A untouched."""

from __future__ import annotations

import json

import pytest
import torch

from clipbank.cli import main
from model_store.backbone import load_backbone
from model_store.bundle import read_bundle
from model_store.errors import BackboneMismatch
from model_store.inference import ClassifyItem, classify_batch
from model_store.reference import find_reference
from model_store.store import LocalStore
from training.data import load_domain
from training.evaluate import route_report

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["textures", "glyphs"])
def test_training_lifts_accuracy_far_above_zero_shot(trained, name):
    _, reports, _ = trained
    r = reports[name]
    assert r["val_accuracy"] >= 0.65, r
    assert r["val_accuracy"] >= r["zero_shot_val_accuracy"] + 0.4, r


def test_second_task_trains_on_top_of_the_first(trained):
    store, _, _ = trained
    glyphs = store.load(store.active()["glyphs"])
    textures = store.load(store.active()["textures"])
    assert set(glyphs.uses) == set(textures.experts)  # its router sees every published expert, frozen


def test_held_out_images_route_to_their_task_and_pretraining_images_to_zero_shot(trained):
    _, _, banks = trained
    sets = {name: load_domain(name, "test") for name in ("textures", "glyphs", "shapes")}
    report = route_report(banks["glyphs"], sets)
    assert report["textures"]["routes"].get("textures", 0) >= 0.9, report
    assert report["glyphs"]["routes"].get("glyphs", 0) >= 0.9, report
    assert report["shapes"]["routes"].get("zero-shot", 0) >= 0.9, report
    for name in ("textures", "glyphs"):
        assert report[name]["auto_accuracy"] > report[name]["zero_shot_accuracy"] + 0.2, report


def test_adding_glyphs_leaves_textures_bit_identical(trained):
    _, _, banks = trained
    data = load_domain("textures", "test")
    x = torch.stack([banks["textures"].backbone.preprocess(im) for im in data.images[:16]])
    item = ClassifyItem(x, tuple(data.classes), task="textures")
    (before,), (after,) = classify_batch(banks["textures"], [item]), classify_batch(banks["glyphs"], [item])
    assert [r.labels for r in before] == [r.labels for r in after]


def test_cli_export_and_train(tmp_path, capsys):
    assert main(["data", "export", "textures", str(tmp_path / "tex")]) == 0
    args = [
        "train",
        "--task",
        "tex",
        "--data",
        str(tmp_path / "tex" / "train"),
        "--val",
        str(tmp_path / "tex" / "val"),
        "--store",
        str(tmp_path / "store"),
        "--out",
        str(tmp_path / "tex.safetensors"),
        "--steps",
        "5",
        "--templates",
        "a photo of a {}.|a close-up of a {} texture.",
    ]
    capsys.readouterr()
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["version"] == 1 and summary["task"] == "tex"
    bundle = read_bundle((tmp_path / "tex.safetensors").read_bytes())
    assert bundle.id == summary["bundle_id"] and bundle.manifest.training["steps"] == 5
    assert "zero_shot_val_accuracy" in bundle.manifest.training
    assert bundle.manifest.templates == ("a photo of a {}.", "a close-up of a {} texture.")  # its serving ensemble
    routing = summary["routing"]  # what routing will do, printed and in the manifest
    assert routing == bundle.manifest.training["routing"]
    assert routing["reference"]["n"] == len(find_reference(load_backbone("tiny")))  # the tiny one ships
    assert 0.0 <= routing["self_claim"] <= 1.0 and 0.0 <= routing["reference_false_claim"] <= 1.0
    assert routing["bank_tasks"] == [] and routing["task_false_claim"] == {}
    assert LocalStore(tmp_path / "store").active() == {"tex": bundle.id}
    assert main(args) == 2  # its --out exists: replaced only when asked
    assert "exists; give a new file name, or --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0  # a second run becomes version 2, with version 1 as its parent
    summary2 = json.loads(capsys.readouterr().out)
    assert summary2["version"] == 2
    assert summary2["routing"]["bank_tasks"] == []  # its own earlier version is not a negative
    assert read_bundle((tmp_path / "tex.safetensors").read_bytes()).manifest.parent == bundle.id


def test_cli_reports_bad_input(tmp_path, capsys):
    assert main(["train", "--task", "Bad Name", "--data", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "invalid TrainConfig: task 'Bad Name'" in err and "bundle_invalid" not in err  # no bundle yet
    assert main(["train", "--task", "ok", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert main(["data", "export", "textures", str(tmp_path / "tex")]) == 0
    capsys.readouterr()
    args = ["train", "--task", "ok", "--data", str(tmp_path / "tex" / "train"), "--out", str(tmp_path / "x")]
    assert main([*args, "--reference", str(tmp_path / "nope.safetensors")]) == 2
    assert "reference set" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main([*args, "--templates", "a photo of a {}.|a {0} drawing"]) == 2
    assert "'a {0} drawing'" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # options once taken quietly: each is named, and nothing is trained or written
    (tmp_path / "a-file").write_text("not a store")
    for extra, named in [
        (["--templates", " | "], "names no template"),
        (["--expert-blocks", "99"], "expert_blocks=99, but this backbone's towers have 4 blocks"),
        (["--store", str(tmp_path / "a-file")], "a-file is a file, not a folder"),
        (["--steps", "0"], "invalid TrainConfig: steps must be >= 1, got 0"),
        (["--threads", "-1"], "--threads must be >= 0 (0: PyTorch's default), got -1"),
    ]:
        assert main([*args, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert named in err and "warm_start_steps" not in err and not (tmp_path / "x").exists(), (extra, err)


def test_threads_sets_the_compute_threads_of_training(tmp_path, monkeypatch):
    """Three trainings at once on 2 cores, each on PyTorch's default threads, ran at 4-6 s a step, against 0.4 s
    with one thread each (an outside check): `--threads` says how many (0, the default, leaves PyTorch's)."""
    import torch

    asked: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    assert main(["data", "export", "textures", str(tmp_path / "tex")]) == 0
    args = ["train", "--task", "t", "--data", str(tmp_path / "tex" / "train"), "--steps", "2", "--batch-size", "8"]
    assert main([*args, "--threads", "1", "--out", str(tmp_path / "a.safetensors")]) == 0
    assert asked == [1] and (tmp_path / "a.safetensors").is_file()


def test_bundle_size_formula_matches_trained_bundles(trained, backbone):
    from model_store.bundle import MAX_PROBES, expected_tensor_bytes, tensor_bytes
    from model_store.selector import SelectorConfig

    store, _, _ = trained
    towers = {t: (s.width, s.layers) for t, s in backbone.towers.items()}
    for task, existing in (("textures", 0), ("glyphs", 2)):
        bundle = store.load(store.active()[task])
        probes = len(bundle.probes)
        assert probes == min(MAX_PROBES, bundle.manifest.training["val_images"])
        gate = SelectorConfig.hidden  # the default kind, hybrid, adds its gate to the autoencoder
        assert bundle.manifest.selector.kind == "hybrid"
        want = expected_tensor_bytes(
            towers, backbone.embed_dim, existing_per_block=existing, probes=probes, gate_hidden=gate
        )
        assert tensor_bytes(bundle) == want
        assert bundle.file_bytes - tensor_bytes(bundle) < 64 * 1024  # the rest is the JSON header


def test_activation_counts_cover_every_training_image(trained):
    store, reports, _ = trained
    counts = reports["glyphs"]["activation_counts"]
    n = reports["glyphs"]["train_images"]
    assert set(counts) == {f"{t}.{b}" for t in ("text", "visual") for b in range(4)}
    n_classes = len(store.load(store.active()["glyphs"]).manifest.classes)
    for key, c in counts.items():
        assert len(c) == 4  # two textures experts (frozen) + two new ones
        assert sum(c) == 2 * (n if key.startswith("visual") else n_classes)  # top-2 per image or per prompt


def test_new_version_answers_over_every_class_seen(tmp_path, capsys):
    import shutil

    assert main(["data", "export", "textures", str(tmp_path / "tex")]) == 0
    classes = sorted(p.name for p in (tmp_path / "tex" / "train").iterdir())
    for step, names in (("a", classes[:3]), ("b", classes[3:])):
        for name in names:
            shutil.copytree(tmp_path / "tex" / "train" / name, tmp_path / step / name)
    store = str(tmp_path / "store")
    capsys.readouterr()
    summaries = []
    val = str(tmp_path / "tex" / "val")  # every class: v2 may be validated on its parent's classes too
    for step, how in (("a", []), ("b", ["--no-activate", "--val", val])):
        args = ["train", "--task", "tex", "--data", str(tmp_path / step), "--store", store, "--steps", "3", *how]
        assert main(args) == 0
        summaries.append(json.loads(capsys.readouterr().out))
    summary = summaries[-1]
    assert summary["version"] == 2
    assert [s["activated"] for s in summaries] == [True, False]  # the JSON says whether the store now routes to it
    assert LocalStore(store).active() == {"tex": summaries[0]["bundle_id"]}
    (warning,) = [w for w in summary["warnings"] if "parent's classes" in w]  # v2 saw none of v1's classes
    assert "3 of the parent's classes" in warning and classes[0].replace("_", " ") in warning
    v2 = LocalStore(store).load(summary["bundle_id"])
    assert list(v2.manifest.classes) == [c.replace("_", " ") for c in classes]
    assert summary["val_images"] == len(list((tmp_path / "tex" / "val").rglob("*.png")))  # its forgetting shows
    # kept in the store's listing: `tasks activate` says it, however later (an outside check: nothing was said)
    assert LocalStore(store).version("tex", 2).metrics["train_classes"] == len(classes) - 3
    # a first version has no parent: a validation class its data lacks is still refused
    args = ["train", "--task", "other", "--data", str(tmp_path / "a"), "--val", val, "--store", store, "--steps", "1"]
    assert main(args) == 2 and "it has classes the training data lacks" in capsys.readouterr().err


def _trained_as(bank, train, cfg, seed: int, version: int, routing: dict):
    """What `train_task` returns, for a random bundle of `cfg.task`: a stand-in that trains nothing."""
    from model_store.bank import empty_bank
    from tests.helpers import random_bundle
    from training.trainer import TrainResult

    data = random_bundle(empty_bank(bank.backbone), cfg.task, seed, version=version)
    keys = ("zero_shot_val_accuracy", "val_accuracy", "val_balanced_accuracy", "seconds", "train_images")
    report = {**dict.fromkeys(keys, 0), "val_images": 0, "bundle_bytes": len(data), "experts_added": 16}
    report.update(val_accuracy_per_class={}, val_warnings=[], warnings=[], classes=list(train.classes))
    return TrainResult(data, {**report, "selector": {"kind": "hybrid", "threshold": 1.0}, "routing": routing})


@pytest.mark.parametrize("case", ["refused", "forced", "licence"])
def test_a_version_trained_into_a_store_that_the_gate_would_refuse_is_stored_inactive(
    tmp_path, monkeypatch, capsys, case
):
    """An outside check's: `train --store` warned that a server's gate would refuse the version, activated it all
    the same, and 9% of an older task's images went to it; nothing marked the version afterwards, and later the
    older task could not be activated again past the gate. Now it is stored inactive with its gate report (marked a
    preview: no licence for the next version), as a server's gate would leave it, and the command exits 1; `--force`
    activates it. "licence" (the review's): what the serving v1 takes already is not taken by v2 only when v1
    passed a server's gate; forced past it, v1 is no licence, so v2 taking the same 9% is refused too."""
    import json

    import training.run as run

    store = tmp_path / "store"
    offence = "it would take 10.7% of the images of task 'gradients' (limit 2.0%)"
    taken = {"stolen": {"gradients": 0.107}} if case != "licence" else {"already_taken": {"gradients": 0.107}}
    preview = {"task": "tex", "version": 1, "self_claim": 0.9, "zero_shot_captured": 0.0, **taken}

    def train(bank, train, cfg, val=None, version=1, parent=None, progress=True, reference=None, **_):
        routing = {"warnings": [], "gate": {**preview, "version": version}}
        return _trained_as(bank, train, cfg, 7 + version, version, routing)

    monkeypatch.setattr(run, "train_task", train)
    assert main(["data", "export", "textures", str(tmp_path / "tex")]) == 0
    args = ["train", "--task", "tex", "--data", str(tmp_path / "tex" / "val"), "--store", str(store)]
    if case == "licence":  # v1 went live forced past the gate (its report failed); v2 keeps what it takes
        assert main([*args, "--force"]) == 0
    capsys.readouterr()
    force = case == "forced"
    assert main(args + ["--force"] * force) == (0 if force else 1)
    out = json.loads(capsys.readouterr().out)
    index, version = LocalStore(store).index(), out["version"]
    active = index.task("tex").active_record()
    assert out["activated"] is force and (active is not None and active.version == version) is force
    stored = index.version("tex", version).gate  # kept beside the version, as a server keeps an upload's
    assert stored["preview"] is True and stored["offences"] == [offence] and stored["passed"] is False
    assert out.get("gate_refused", False) is not force
    if not force:
        said = next(w for w in out["warnings"] if "stored inactive" in w)
        assert offence in said and "--force" in said
        assert ("the version serving keeps serving" in said) == (case == "licence")
    # a file is gated by the server it is pushed to: a usage error, before any training
    assert main(["train", "--task", "tex", "--data", str(tmp_path / "tex" / "val"), "--out", "x", "--force"]) == 2
    assert "--force activates the version put in --store" in capsys.readouterr().err


def test_a_bundle_the_store_refuses_after_training_is_kept_on_disk(tmp_path, monkeypatch, capsys, caplog):
    """Training takes long; if the store then refuses the bundle (another writer took its version meanwhile), the
    bundle is saved where the log says, under a name no earlier failure took, not lost with the error. Training
    itself is stood in for here."""
    import training.run as run
    from model_store.bank import empty_bank
    from tests.helpers import random_bundle

    store, trained = tmp_path / "store", []

    def train_meanwhile(bank, train, cfg, val=None, version=1, parent=None, progress=True, reference=None, **_):
        trained.append(cfg.task)
        LocalStore(store).put(random_bundle(empty_bank(bank.backbone), cfg.task, 99, version=version))
        return _trained_as(bank, train, cfg, 7, version, {"warnings": []})

    monkeypatch.setattr(run, "train_task", train_meanwhile)
    assert main(["data", "export", "textures", str(tmp_path / "tex")]) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    for task, kept in (("tex", "tex-v1-unstored.safetensors"), ("tex", "tex-v2-unstored.safetensors")):
        args = ["train", "--task", task, "--data", str(tmp_path / "tex" / "val"), "--store", str(store)]
        caplog.clear()
        assert main(args) == 2
        err = capsys.readouterr().err  # not "train it with --version N": no store takes it as it is
        assert "version_conflict: another writer stored version" in err and "train again with --store" in err
        assert "VersionConflict" in caplog.text and "push it to a server" not in caplog.text
        assert str(tmp_path / kept) in caplog.text and read_bundle((tmp_path / kept).read_bytes()).manifest.task == task
        assert ("no store at" in caplog.text) == (kept == "tex-v1-unstored.safetensors")  # a new store is said
    (tmp_path / "store").rename(tmp_path / "store-0")  # the same failure again, at version 1: a new name
    assert main(["train", "--task", "tex", "--data", str(tmp_path / "tex" / "val"), "--store", str(store)]) == 2
    assert (tmp_path / "tex-v1-unstored-2.safetensors").exists()
    # a bad --out fails before training, not after it
    (tmp_path / "adir").mkdir()
    trained.clear()
    assert (
        main(["train", "--task", "tex", "--data", str(tmp_path / "tex" / "val"), "--out", str(tmp_path / "adir")]) == 2
    )
    assert "is a directory" in capsys.readouterr().err and trained == []
    # a store no change can be made to, and --no-activate with no store to apply to: before training too
    assert main(["train", "--task", "tex", "--data", str(tmp_path / "tex" / "val"), "--store", "/proc/s"]) == 2
    assert "/proc/s" in capsys.readouterr().err and trained == []
    no_activate = ["--out", str(tmp_path / "n.safetensors"), "--no-activate"]
    assert main(["train", "--task", "tex", "--data", str(tmp_path / "tex" / "val"), *no_activate]) == 2
    assert "--no-activate applies to the version put in --store" in capsys.readouterr().err and trained == []
    # a folder no file can be created in, although os.access may say it can be written (root, /proc)
    unwritable = "/proc/clipbank-out.safetensors"
    assert main(["train", "--task", "tex", "--data", str(tmp_path / "tex" / "val"), "--out", unwritable]) == 2
    assert "--out: cannot make or write in /proc" in capsys.readouterr().err and trained == []
    # an existing file (another task's bundle, maybe its only copy) is replaced only with --overwrite
    kept = tmp_path / "tex-v1-unstored.safetensors"
    before = kept.read_bytes()
    assert main(["train", "--task", "other", "--data", str(tmp_path / "tex" / "val"), "--out", str(kept)]) == 2
    assert "exists; give a new file name, or --overwrite" in capsys.readouterr().err and trained == []
    assert kept.read_bytes() == before
    assert (
        main(["train", "--task", "other", "--data", str(tmp_path / "tex" / "val"), "--out", str(kept), "--overwrite"])
        == 0
    )
    assert read_bundle(kept.read_bytes()).manifest.task == "other"
    # a new version of a task a server holds, trained away from its store (the README's gated way: --out, push)
    data = ["--task", "next", "--data", str(tmp_path / "tex" / "val")]
    assert main(["train", *data, "--out", str(tmp_path / "next-v3.safetensors"), "--version", "3"]) == 0
    assert read_bundle((tmp_path / "next-v3.safetensors").read_bytes()).manifest.version == 3
    for bad, message in ((["--version", "0"], "--version must be in [1, "), (["--store", "s"], "without --store")):
        assert main(["train", *data, "--out", str(tmp_path / "x.safetensors"), "--version", "2", *bad]) == 2
        assert message in capsys.readouterr().err


def test_train_store_says_what_the_new_version_costs_the_one_it_replaces(tmp_path, monkeypatch, capsys, caplog):
    """An outside check: `train --store` made a v2 active that lacked v1's classes (or scored 81% against 95%) and
    said nothing; `push` and `tasks activate` said it. It says the same now, in the log and the summary."""
    import json

    import training.run as run
    from model_store.bank import empty_bank
    from tests.helpers import random_bundle
    from training.trainer import TrainResult

    store = tmp_path / "store"

    def train_narrower(bank, train, cfg, val=None, version=1, parent=None, progress=True, reference=None, **_):
        result = _trained_as(bank, train, cfg, 7, version, {"warnings": []})
        data = random_bundle(empty_bank(bank.backbone), cfg.task, 7, version=version, classes=("alpha", "delta"))
        return TrainResult(data, result.report)

    monkeypatch.setattr(run, "train_task", train_narrower)
    assert main(["data", "export", "textures", str(tmp_path / "tex")]) == 0
    from model_store.backbone import load_backbone

    LocalStore(store).put(random_bundle(empty_bank(load_backbone()), "tex", 1, classes=("alpha", "beta", "gamma")))
    capsys.readouterr()
    assert main(["train", "--task", "tex", "--data", str(tmp_path / "tex" / "val"), "--store", str(store)]) == 0
    summary = json.loads(capsys.readouterr().out)
    said = "task tex v2 replaces v1 and lacks 2 of its 3 classes (beta, gamma)"
    assert any(w.startswith(said) for w in summary["warnings"]) and said in caplog.text, summary["warnings"]


def test_a_file_made_at_out_while_training_is_not_replaced(tmp_path, monkeypatch, capsys, caplog):
    """An outside check: `--out` was checked before training only; a file made there meanwhile (another run's
    bundle, 2 s later) was replaced at the end with exit 0. It is kept, the new bundle saved beside it, exit 2."""
    import training.run as run
    from model_store.files import atomic_write

    out = tmp_path / "race.safetensors"

    def train_meanwhile(bank, train, cfg, val=None, version=1, parent=None, progress=True, reference=None, **_):
        out.write_bytes(b"precious bundle")
        return _trained_as(bank, train, cfg, 7, version, {"warnings": []})

    monkeypatch.setattr(run, "train_task", train_meanwhile)
    assert main(["data", "export", "textures", str(tmp_path / "tex")]) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["train", "--task", "race", "--data", str(tmp_path / "tex" / "val"), "--out", str(out)]) == 2
    assert out.read_bytes() == b"precious bundle"
    assert "made by something else while this one was written" in capsys.readouterr().err
    assert read_bundle((tmp_path / "race-v1-unstored.safetensors").read_bytes()).manifest.task == "race"
    assert not list(tmp_path.glob(".tmp-*"))
    out.write_bytes(b"old")  # --overwrite replaces it, as it said
    assert (
        main(["train", "--task", "race", "--data", str(tmp_path / "tex" / "val"), "--out", str(out), "--overwrite"])
        == 0
    )
    assert read_bundle(out.read_bytes()).manifest.task == "race"
    atomic_write(tmp_path / "new", b"x", exclusive=True)  # a free name is written as ever
    assert (tmp_path / "new").read_bytes() == b"x"
    import errno
    import os

    def no_links(src, dst):  # the review's: FUSE mounts (gcsfuse, mountpoint-s3) have no hard links
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "link", no_links)
    atomic_write(tmp_path / "fuse", b"y", exclusive=True)  # checked, then renamed
    assert (tmp_path / "fuse").read_bytes() == b"y"
    with pytest.raises(FileExistsError, match="made by something else"):
        atomic_write(tmp_path / "fuse", b"z", exclusive=True)
    assert (tmp_path / "fuse").read_bytes() == b"y" and not list(tmp_path.glob(".tmp-*"))


def test_labels_the_bundle_could_not_hold_fail_before_training(backbone, monkeypatch):
    """A class list or template set over the manifest's bounds (a parent's classes merged in, say) is refused
    before the run, not after it, when the bundle is packed."""
    from PIL import Image

    import model_store.labels
    import training.trainer
    from model_store.bank import empty_bank
    from training.data import LabelledImages
    from training.trainer import TrainConfig, train_task

    def no_training(*a, **k):
        raise AssertionError("trained although the bundle could not be packed")

    monkeypatch.setattr(training.trainer, "_train_loop", no_training)
    monkeypatch.setattr(model_store.labels, "MAX_PROMPTS", 3)
    data = LabelledImages([Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(6)], [0, 1] * 3, ("cat", "dog"))
    cfg = TrainConfig(task="pets", steps=2, templates=("a {}.", "the {}."))
    with pytest.raises(ValueError, match=r"classes x templates = 4 prompts; at most 3"):
        train_task(empty_bank(backbone), data, cfg, val=data, progress=False)
    long_name = LabelledImages(data.images, data.labels, ("cat", "d" * 201))
    with pytest.raises(ValueError, match=r"classes\[1\]"):
        train_task(empty_bank(backbone), long_name, TrainConfig(task="pets", steps=2), val=long_name, progress=False)
    # distinct folder names the tokenizer reads as one class: training could never tell them apart
    twins = LabelledImages(data.images, data.labels, ("Cat", "cat"))
    with pytest.raises(ValueError, match="classes 'Cat' and 'cat' are the same text to the backbone's tokenizer"):
        train_task(empty_bank(backbone), twins, TrainConfig(task="pets", steps=2), val=twins, progress=False)


def test_a_dataset_with_nothing_to_hold_out_fails_before_training(backbone, monkeypatch):
    from PIL import Image

    import training.trainer
    from model_store.bank import empty_bank
    from training.data import LabelledImages
    from training.trainer import TrainConfig, train_task

    def no_training(*a, **k):
        raise AssertionError("trained although nothing could be held out")

    monkeypatch.setattr(training.trainer, "_train_loop", no_training)
    data = LabelledImages([Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), (255, 0, 0))], [0, 1], ("a", "b"))
    with pytest.raises(ValueError, match="no class has 2 images.*--val"):
        train_task(empty_bank(backbone), data, TrainConfig(task="one-each", steps=2), progress=False)


def test_a_task_at_the_last_version_fails_before_training(tmp_path, backbone, monkeypatch, capsys):
    from clipbank.cli import main
    from model_store.bank import empty_bank
    from model_store.manifest import MAX_VERSION
    from model_store.store import LocalStore
    from tests.helpers import random_bundle
    from training import run

    def no_training(*a, **k):
        raise AssertionError("trained although no version is left for the bundle")

    monkeypatch.setattr(run, "train_task", no_training)
    store = LocalStore(tmp_path / "store")
    store.put(random_bundle(empty_bank(backbone), "tex", seed=3, version=MAX_VERSION))
    assert main(["data", "export", "textures", str(tmp_path / "tex")]) == 0
    capsys.readouterr()
    args = ["train", "--task", "tex", "--data", str(tmp_path / "tex" / "val"), "--store", str(tmp_path / "store")]
    assert main(args) == 2
    assert f"is at version {MAX_VERSION}, the last a bundle can have" in capsys.readouterr().err


def test_a_diverging_run_stops_at_its_first_non_finite_loss_and_says_so(backbone):
    """A learning rate far too large gives nan losses: the run stops there with the cause, not after every step
    with a bundle that cannot be packed (its report's NaN is not JSON)."""
    from model_store.bank import empty_bank
    from training.trainer import TrainConfig, train_task

    data = load_domain("textures", "val").subset(range(24))
    cfg = TrainConfig(task="boom", steps=50, batch_size=8, lr=1e30)
    with pytest.raises(ValueError, match=r"training diverged: the loss is nan at step \d+ of task 'boom'.*1e\+30"):
        train_task(empty_bank(backbone), data, cfg, val=data, progress=False)


def test_the_python_api_trains_against_the_backbones_reference_set_by_default(backbone):
    """`train_task(bank, data, cfg)`, as the package's docstring shows it, fitted its selector without the tiny
    backbone's shipped reference set: the server's gate then refused the bundle (14% of generic images claimed)."""
    from model_store.bank import empty_bank
    from training import TrainConfig, train_task

    data = load_domain("textures", "val")
    cfg = TrainConfig(task="tex", steps=2, batch_size=8)
    report = train_task(empty_bank(backbone), data, cfg, progress=False).report["routing"]
    assert report["reference"] and report["reference_false_claim"] is not None
    without = train_task(empty_bank(backbone), data, cfg, progress=False, reference=None).report["routing"]
    assert not without["reference"]
    with pytest.raises(ValueError, match="reference is a ReferenceSet, None or 'auto'"):
        train_task(empty_bank(backbone), data, cfg, progress=False, reference="ref.safetensors")


def test_the_summary_carries_what_was_said_about_the_data(tmp_path, capsys):
    """Skipped files, one-image classes and a new store were said on stderr only: a script reading the summary
    JSON never saw them (an outside check with its own ImageFolders)."""
    import shutil

    assert main(["data", "export", "textures", str(tmp_path / "tex")]) == 0
    data = tmp_path / "mine"
    for name in ("dots", "stripes"):
        shutil.copytree(tmp_path / "tex" / "train" / name, data / name)
    (data / "dots" / "notes.txt").write_text("not an image")
    (data / "single").mkdir()
    shutil.copy(next((data / "dots").glob("*.png")), data / "single" / "only.png")
    capsys.readouterr()
    args = ["train", "--task", "mine", "--data", str(data), "--val", str(data), "--steps", "2"]
    assert main([*args, "--store", str(tmp_path / "new-store")]) == 0
    summary = json.loads(capsys.readouterr().out)
    warnings = summary["warnings"]
    assert set(summary["val_accuracy_per_class"]) == {"dots", "stripes", "single"}  # and balanced: each class alike
    per_class = summary["val_accuracy_per_class"].values()
    assert abs(summary["val_balanced_accuracy"] - sum(per_class) / 3) < 1e-9
    said = [
        "1 files not read (1 .txt)",
        "['single'] have one image each",
        "--val is --data's folder",
        f"no store at {tmp_path / 'new-store'}: a new, empty one is made",
    ]
    assert all(any(s in w for w in warnings) for s in said), warnings
    assert len(warnings) == len(set(warnings))


def test_a_val_folder_copied_from_the_training_folder_is_warned_of(tmp_path, caplog):
    """`cp -r train valdup` then `--val valdup`: only the very same path was noticed; its selector was calibrated
    on training images without a word."""
    import logging
    import shutil

    from training.data import list_image_folder
    from training.validation import warn_if_val_copies_data

    assert main(["data", "export", "textures", str(tmp_path / "tex")]) == 0
    shutil.copytree(tmp_path / "tex" / "train", tmp_path / "valdup")
    train = list_image_folder(tmp_path / "tex" / "train")
    with caplog.at_level(logging.WARNING):
        warn_if_val_copies_data(train, list_image_folder(tmp_path / "tex" / "val", train.classes))
        assert "also in --data" not in caplog.text  # a real validation split
        warn_if_val_copies_data(train, list_image_folder(tmp_path / "valdup", train.classes))
    n = len(train.paths)
    assert f"{n} of the {n} --val images are also in --data (the same class, file name and bytes)" in caplog.text
    caplog.clear()
    for p in (tmp_path / "valdup").rglob("*.png"):  # the same names and sizes, other bytes: other images
        data = bytearray(p.read_bytes())
        data[-5] ^= 0xFF
        p.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        warn_if_val_copies_data(train, list_image_folder(tmp_path / "valdup", train.classes))
    assert "also in --data" not in caplog.text


def test_what_the_image_folder_reader_says_of_a_val_folder_and_an_empty_file(tmp_path):
    from training.data import load_image_folder

    for name in ("a", "b", "c"):
        (tmp_path / "train" / name).mkdir(parents=True)
        (tmp_path / "train" / name / "x.png").write_bytes(b"")
    for name in ("a", "b", "d"):
        (tmp_path / "val" / name).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"classes the training data lacks: \['d'\]; it lacks \['c'\]"):
        load_image_folder(tmp_path / "val", ("a", "b", "c"))
    with pytest.raises(ValueError, match=r"x.png is empty \(0 bytes\)"):  # was "cannot identify image file"
        load_image_folder(tmp_path / "train")


def test_the_folders_faults_are_said_before_the_backbone_loads(tmp_path, monkeypatch):
    """Reading JPEGs at the backbone's scale must not delay a folder's faults until after its download."""
    from PIL import Image

    import training.run as run
    from training.config import TrainJob

    for split, names in (("train", ("a", "b")), ("val", ("a", "c"))):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / name / "x.png")
    monkeypatch.setattr(run, "load_backbone", lambda *a, **k: pytest.fail("the backbone loaded first"))
    job = TrainJob(task="t", data=str(tmp_path / "train"), val=str(tmp_path / "val"), out=str(tmp_path / "t.st"))
    with pytest.raises(ValueError, match=r"it has classes the training data lacks: \['c'\]; it lacks \['b'\]"):
        run.run_train_job(job)


def test_training_beside_a_store_of_another_backbone_is_refused_before_it_starts(tmp_path, backbone, caplog):
    """An outside check trained with --store on a ViT-B-32 store: the task trained on an empty bank, silently. A
    later one: with a warning only, the version went active and every server of the store took the task offline."""
    from model_store.bank import empty_bank
    from tests.helpers import edit_bundle, random_bundle
    from training.run import _bank_of

    other = edit_bundle(
        random_bundle(empty_bank(backbone), "dig", 5),
        manifest=lambda m: m["backbone"].update(fingerprint="0" * 64, arch="ViT-B-32"),
    )
    store = LocalStore(tmp_path / "store")
    store.put(other)
    with pytest.raises(BackboneMismatch, match=r"holds tasks of another backbone than tiny \(dig\).*own store"):
        _bank_of(store, backbone)
    assert "task dig of the store is left out of the bank this task trains beside: backbone_mismatch" in caplog.text


def test_a_failed_run_leaves_no_folder_its_out_check_made(tmp_path, capsys):
    """`--out newdir/sub/x.safetensors` made both folders before any work, and a run that then failed left them
    (an outside check: `--out /nonexist/z.safetensors` left /nonexist behind)."""
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "new" / "sub" / "x.safetensors"
    assert main(["train", "--task", "x", "--data", str(tmp_path / "no-such-data"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]

"""Offline domains: deterministic splits and ImageFolder export."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from training.data import load_image_folder
from training.domains import DOMAINS, get_domain
from training.export import export_domain


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_splits_are_deterministic_and_distinct(name):
    d = get_domain(name)
    a_imgs, a_labels = d.split("val")
    b_imgs, b_labels = d.split("val")
    assert a_labels == b_labels
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a_imgs[:20], b_imgs[:20], strict=True))
    test_imgs, _ = d.split("test")
    assert not np.array_equal(np.asarray(a_imgs[0]), np.asarray(test_imgs[0]))
    assert set(a_labels) == set(range(len(d.classes)))


def test_export_round_trip(tmp_path):
    counts = export_domain("textures", tmp_path)
    assert set(counts) == {"train", "val", "test"}
    data = load_image_folder(tmp_path / "val")
    assert set(data.classes) == set(get_domain("textures").classes)
    assert len(data) == counts["val"]


def test_unknown_domain():
    with pytest.raises(ValueError, match="known: arrows, clocks, clutter"):
        get_domain("mnist")


def test_image_folders_that_cannot_become_a_bundle_fail_before_any_image_is_read(tmp_path):
    from PIL import Image

    for folder in ("a_b", "a b"):
        (tmp_path / "clash" / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "clash" / folder / "x.png")
    with pytest.raises(ValueError, match=r"both name the class 'a b' \('_' reads as a space\): rename one"):
        load_image_folder(tmp_path / "clash")
    for folder in ("caf\u00e9", "cafe\u0301"):  # as Linux and macOS write it: the names look the same
        (tmp_path / "forms" / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "forms" / folder / "x.png")
    with pytest.raises(ValueError, match="in two Unicode forms") as raised:
        load_image_folder(tmp_path / "forms")
    assert "'caf\\xe9'" in str(raised.value) and "'cafe\\u0301'" in str(raised.value)
    assert "reads as a space" not in str(raised.value)
    (tmp_path / "linked" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "linked" / "cat" / "x.png")
    (tmp_path / "linked" / "dog").symlink_to(tmp_path / "linked" / "cat")
    with pytest.raises(ValueError, match="'cat' and 'dog' of .* are the same folder"):
        load_image_folder(tmp_path / "linked")
    (tmp_path / "linked" / "dog").unlink()
    (tmp_path / "linked" / "dog").symlink_to(tmp_path / "clash" / "a b")  # a folder kept elsewhere is fine
    assert load_image_folder(tmp_path / "linked").classes == ("cat", "dog")
    for bad in ("c" * 201, "_"):  # too long; only a space once '_' reads as one
        (tmp_path / bad / bad).mkdir(parents=True)
        with pytest.raises(ValueError, match="cannot make a task: classes must be a list"):
            load_image_folder(tmp_path / bad)


def test_an_unreadable_training_image_is_a_value_error_naming_the_file(tmp_path):
    """A 24 KB PNG of 200 megapixels raised Pillow's DecompressionBombError, which is no OSError: a traceback."""
    from tests.reliability.payloads import full_png, lying_png

    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "b").mkdir(parents=True)
    (tmp_path / "data" / "a" / "ok.png").write_bytes(full_png(8, 8))
    (tmp_path / "data" / "b" / "bomb.png").write_bytes(lying_png(20_000, 10_000))
    with pytest.raises(ValueError, match="bomb.png has too many pixels"):
        load_image_folder(tmp_path / "data")
    (tmp_path / "data" / "b" / "bomb.png").write_bytes(full_png(8, 8)[:40])
    with pytest.raises(ValueError, match="bomb.png could not be read as an image"):
        load_image_folder(tmp_path / "data")
    # 1x60000: a few hundred bytes that the CLIP resize made 1 GB and 3 s at every read; the server refuses it too
    (tmp_path / "data" / "b" / "bomb.png").write_bytes(full_png(1, 60_000))
    with pytest.raises(ValueError, match="bomb.png is 1x60000, an aspect ratio of 60000:1; the limit is 20:1"):
        load_image_folder(tmp_path / "data")


def test_class_folders_must_hold_images_and_hidden_files_are_skipped(tmp_path):
    from PIL import Image

    from training.data import load_image_folder

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "0.png")
    (tmp_path / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata, not an image
    assert len(load_image_folder(tmp_path)) == 2
    (tmp_path / "c" / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "c" / "sub" / "0.png")
    with pytest.raises(ValueError, match="c holds no images, but its sub-folders do .1.: if they are the classes"):
        load_image_folder(tmp_path)


def test_files_that_are_not_read_are_named_and_a_folder_of_splits_is_pointed_at(tmp_path, caplog):
    """An outside check: .tga/.ppm files and images in sub-folders were dropped without a word, a folder of only
    .jfif JPEGs 'held no images', and `--data data` (data/train/<classes>) was told to move its images."""
    from PIL import Image

    from training.data import load_image_folder

    for name in ("a", "b"):
        (tmp_path / "d" / name / "deeper").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "d" / name / "0.png")
        Image.new("RGB", (8, 8)).save(tmp_path / "d" / name / "1.jfif", format="JPEG")
        Image.new("RGB", (8, 8)).save(tmp_path / "d" / name / "2.tga")
        Image.new("RGB", (8, 8)).save(tmp_path / "d" / name / "deeper" / "3.png")
    (tmp_path / "d" / "a" / "notes.txt").write_text("x")
    with caplog.at_level("WARNING"):
        data = load_image_folder(tmp_path / "d")
    assert len(data) == 4  # the .png and the .jfif of each class
    assert "5 files not read (2 .tga, 1 .txt, 2 in sub-folders" in caplog.text, caplog.text
    (tmp_path / "t" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "t" / "a" / "0.tga")
    (tmp_path / "t" / "b").mkdir()
    with pytest.raises(ValueError, match=r"t.a holds no images \(.bmp, .*\); it holds 1 .tga; remove it"):
        load_image_folder(tmp_path / "t")
    with pytest.raises(ValueError, match=r"d holds no images, but its sub-folders do \(6\): if they are the classes"):
        load_image_folder(tmp_path)  # the folder above the classes


def test_a_class_name_that_is_not_valid_unicode_is_refused():
    """A folder name that is not UTF-8 decodes to a lone surrogate: stored, it made the server's task list a 500."""
    from model_store.labels import classes_problem

    assert classes_problem(["caf\udce9", "tea"]) and not classes_problem(["café", "tea"])


def test_export_refuses_a_folder_that_holds_a_dataset_already(tmp_path):
    export_domain("textures", tmp_path / "t", splits=("val",))
    with pytest.raises(ValueError, match="is not a new or empty folder"):
        export_domain("digits", tmp_path / "t", splits=("val",))


def test_the_demo_reuses_its_export_and_a_stopped_one_leaves_no_half_export(tmp_path):
    """`clipbank demo` run a second time, or after Ctrl-C, failed: its export folder was no longer empty."""
    from training.demo import exported

    folder = tmp_path / "data" / "textures"
    (tmp_path / "data" / "textures.part" / "train" / "dots").mkdir(parents=True)  # a run stopped mid-export
    assert exported("textures", folder) == folder and not (tmp_path / "data" / "textures.part").exists()
    stamp = (folder / "test").stat().st_mtime_ns
    assert exported("textures", folder) == folder  # the second run uses it as it is
    assert (folder / "test").stat().st_mtime_ns == stamp
    assert len(load_image_folder(folder / "val")) == len(get_domain("textures").split("val")[0])


def test_store_commands_do_not_make_a_store_where_there_is_none(tmp_path, capsys):
    from clipbank.cli import main

    assert main(["store", "--store", str(tmp_path / "typo"), "list"]) == 2
    assert "no store at" in capsys.readouterr().err and not (tmp_path / "typo").exists()
    assert main(["store", "list", "--store", str(tmp_path / "typo")]) == 2  # after the sub-command, too
    assert f"no store at '{tmp_path / 'typo'}'" in capsys.readouterr().err
    (tmp_path / "photos").mkdir()  # an existing folder that is not a store: left as it is
    assert main(["store", "--store", str(tmp_path / "photos"), "deactivate", "x"]) == 2
    assert "no store at" in capsys.readouterr().err and list((tmp_path / "photos").iterdir()) == []
    (tmp_path / "afile").write_text("x")
    assert main(["store", "--store", str(tmp_path / "afile"), "list"]) == 2
    assert f"no store at '{tmp_path / 'afile'}': it is a file" in capsys.readouterr().err


def test_store_commands_on_an_s3_prefix_with_no_store_say_so(s3_env, capsys, backbone):
    """A mistyped S3 prefix listed as an empty store (generation 0), exit 0."""
    from clipbank.cli import main
    from model_store.bank import empty_bank
    from model_store.store import open_store
    from tests.helpers import random_bundle

    assert main(["store", "--store", f"s3://{s3_env}/typo", "list"]) == 2
    assert f"no store at 's3://{s3_env}/typo'" in capsys.readouterr().err
    assert main(["store", "--store", f"s3://{s3_env}/typo", "deactivate", "cars"]) == 2
    store = open_store(f"s3://{s3_env}/bank")
    store.put(random_bundle(empty_bank(backbone), "cars", seed=1))
    assert main(["store", "--store", f"s3://{s3_env}/bank", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[:3] == ["cars", "1", "active"]
    # a race's losing upload leaves a blob no version names: said, with what deletes it (on S3 too, since an outside
    # check found `store clean` refused there)
    from model_store.digest import bytes_digest

    lost = random_bundle(empty_bank(backbone), "cars", seed=2)
    store._s3.put_object(Bucket=s3_env, Key=store._blob_key(bytes_digest(lost)), Body=lost)
    assert main(["store", "--store", f"s3://{s3_env}/bank", "check"]) == 0
    said = "1 blob(s) no version names (`clipbank store clean`, or any purge, deletes those written over an hour ago)"
    assert said in capsys.readouterr().err


def test_store_activate_and_deactivate_say_what_they_did(tmp_path, capsys, backbone):
    """`store deactivate` printed nothing, `store activate` a bare bundle id."""
    from clipbank.cli import main
    from model_store.bank import empty_bank
    from model_store.store import LocalStore
    from tests.helpers import random_bundle

    LocalStore(tmp_path / "s").put(random_bundle(empty_bank(backbone), "cars", seed=1), activate=False)
    assert main(["store", "--store", str(tmp_path / "s"), "activate", "cars", "1"]) == 0
    assert capsys.readouterr().out.startswith("task cars: version 1 is active (bundle ")
    assert main(["store", "--store", str(tmp_path / "s"), "deactivate", "cars"]) == 0
    assert capsys.readouterr().out.startswith("task cars: deactivated (generation 3); its versions stay stored")
    assert LocalStore(tmp_path / "s").active() == {}
    assert main(["store", "--store", str(tmp_path / "s"), "deactivate", "cars"]) == 0  # said "deactivated" again
    assert capsys.readouterr().out == "task cars: it had no active version; nothing changed\n"
    (blob,) = (tmp_path / "s" / "blobs").iterdir()
    good = blob.read_bytes()
    blob.write_bytes(good[: len(good) // 2])  # damaged: activating it would take the task offline
    assert main(["store", "--store", str(tmp_path / "s"), "activate", "cars", "1"]) == 2
    assert "store_damaged" in capsys.readouterr().err and LocalStore(tmp_path / "s").active() == {}
    blob.write_bytes(good)
    LocalStore(tmp_path / "s").activate("cars", 1)
    assert main(["store", "--store", str(tmp_path / "s"), "deactivate", "cars", "--purge"]) == 0  # active: both
    assert capsys.readouterr().out.startswith("task cars: deactivated and purged, 1 blob(s) deleted")
    assert "cars" not in LocalStore(tmp_path / "s").index().tasks and not list((tmp_path / "s/blobs").iterdir())
    assert main(["store", "--store", str(tmp_path / "s"), "deactivate", "cars", "--purge"]) == 2  # gone: named
    assert "task_not_found" in capsys.readouterr().err


def test_store_check_reports_problems_and_exits_1(tmp_path, capsys, backbone):
    from clipbank.cli import main
    from model_store.backbone_ref import TINY_DIR
    from model_store.bank import empty_bank
    from model_store.store import LocalStore
    from tests.helpers import random_bundle

    store = LocalStore(tmp_path / "s")
    store.put(random_bundle(empty_bank(backbone), "cars", seed=1))
    assert main(["store", "--store", str(tmp_path / "s"), "check"]) == 0
    err = capsys.readouterr().err  # an upgrade check's: "consistent", of a store no server would serve
    assert "the store is consistent (blobs and index only; --backbone REF also checks that a server" in err
    # an outside check's: after an upgrade every task was degraded on the server and `store check` said nothing
    assert main(["store", "--store", str(tmp_path / "s"), "check", "--backbone", "tiny"]) == 0
    config = json.loads((TINY_DIR / "open_clip_config.json").read_text())
    config["model_cfg"]["quick_gelu"] = True  # the same weights, computing otherwise
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "open_clip_config.json").write_text(json.dumps(config))
    shutil.copy(TINY_DIR / "open_clip_model.safetensors", tmp_path / "q" / "open_clip_model.safetensors")
    assert main(["store", "--store", str(tmp_path / "s"), "check", "--backbone", f"local-dir:{tmp_path / 'q'}"]) == 1
    assert "task cars (active version): not served on local-dir:" in capsys.readouterr().out
    (tmp_path / "s" / "index.json").unlink()  # documented: a lost index is damage, `store check` says so
    assert main(["store", "--store", str(tmp_path / "s"), "check"]) == 1
    assert "index.json is missing but blobs/ holds 1 bundles" in capsys.readouterr().out


def test_a_class_folder_named_on_macos_gives_the_composed_class_name(tmp_path):
    """macOS writes "café" as "cafe" and a combining accent; answers returned that to clients, where
    `label == "café"` was False."""
    from PIL import Image

    from training.data import load_image_folder

    for name in ("cafe\u0301 noir", "  tea ", "_milk_"):  # and no spaces at the ends (an outside check's)
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "0.png")
    assert load_image_folder(tmp_path).classes == ("tea", "milk", "caf\u00e9 noir")


def test_every_unusable_image_is_named_at_once_and_a_one_image_class_is_warned_about(tmp_path, caplog):
    """An outside check fixed six over-wide images in six runs: only the first was named each time."""
    from PIL import Image

    from training.data import load_image_folder

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "0.png")
    with caplog.at_level("WARNING"):
        load_image_folder(tmp_path)
    assert "class(es) ['a', 'b'] have one image each" in caplog.text
    for i in range(7):
        Image.new("RGB", (2000, 20)).save(tmp_path / "b" / f"wide{i}.png")
    with pytest.raises(ValueError, match=r"7 of 9 images cannot be used: .*wide0.png is 2000x20.*; and 2 more"):
        load_image_folder(tmp_path)


def test_skip_bad_leaves_unusable_files_out_and_keeps_labels_in_step(tmp_path, caplog):
    """A real dataset with a few broken files used to be untrainable until each was deleted by hand."""
    from PIL import Image

    from training.config import TrainJob
    from training.data import load_image_folder

    for name, colour in (("a", "red"), ("b", "blue")):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), colour).save(tmp_path / name / f"{i}.png")
    (tmp_path / "a" / "1.png").write_bytes(b"not a png")  # a truncated download
    Image.new("RGB", (2000, 20)).save(tmp_path / "b" / "wide.png")
    with pytest.raises(ValueError, match="2 of 7 images cannot be used.*`clipbank train --skip-bad`"):
        load_image_folder(tmp_path)
    with caplog.at_level("WARNING"):
        data = load_image_folder(tmp_path, skip_bad=True)
    assert "2 of 7 images cannot be used and are left out" in caplog.text and "1.png" in caplog.text
    assert len(data) == 5 and data.labels == [0, 0, 1, 1, 1]
    assert [im.getpixel((0, 0)) for im in data.images] == [(255, 0, 0)] * 2 + [(0, 0, 255)] * 3
    for f in (tmp_path / "b").glob("*.png"):
        f.write_bytes(b"")
    with pytest.raises(ValueError, match=r"class\(es\) \['b'\] have no readable image"):
        load_image_folder(tmp_path, skip_bad=True)
    assert TrainJob(task="t", data=str(tmp_path), skip_bad=True).skip_bad  # the flag of `clipbank train`


def test_labelled_images_in_memory_are_checked_before_training():
    """A library caller's data: string labels, 1-based labels, a label short, numpy arrays. Each failed deep in
    training (an IndexError, "too many dimensions 'str'", torchvision's TypeError, or a false "no class has 2
    images"); each is now named on construction."""
    import numpy as np
    from PIL import Image

    from training import LabelledImages

    ims, classes = [Image.new("RGB", (8, 8))] * 3, ("a", "b")
    cases = [
        ((ims, ["a", "b", "a"], classes), ValueError, r"ints in 0\.\.1 into classes, got 'a' \(its index is"),
        ((ims, [1, 2, 1], classes), ValueError, "got 2"),
        ((ims, [0, 1], classes), ValueError, "3 images but 2 labels"),
        (([np.zeros((8, 8, 3), np.uint8)] * 3, [0, 1, 0], classes), TypeError, "PIL.Image.fromarray"),
        ((ims, [0, 1, 0], "ab"), TypeError, "class names"),
        ((ims, [True, 1, 0], classes), ValueError, "got True"),
    ]
    for args, kind, message in cases:
        with pytest.raises(kind, match=message):
            LabelledImages(*args)
    assert len(LabelledImages(ims, [np.int64(0), 1, 0], classes)) == 3  # numpy ints are class indices too


def test_train_says_a_new_store_is_made_on_an_s3_prefix_too_and_refuses_a_file_before_saying_it(
    s3_env, tmp_path, caplog, backbone
):
    """An outside check's: `train --store s3://bucket/typo` made a new store with no word (a folder got the
    warning), and `--store afile` first said a new store is made there, then that it is a file."""
    import logging

    from model_store.bank import empty_bank
    from model_store.errors import StoreError
    from model_store.store import open_store
    from tests.helpers import random_bundle
    from training.run import _open_store

    with caplog.at_level(logging.WARNING):
        _open_store(f"s3://{s3_env}/typo")
        assert f"no store at s3://{s3_env}/typo: a new, empty one is made" in caplog.text
        caplog.clear()
        open_store(f"s3://{s3_env}/bank").put(random_bundle(empty_bank(backbone), "cars", seed=1))
        _open_store(f"s3://{s3_env}/bank")
        (tmp_path / "afile").write_text("x")
        with pytest.raises(StoreError, match="is a file"):
            _open_store(str(tmp_path / "afile"))
        assert "no store at" not in caplog.text


def test_what_an_image_folder_leaves_out_at_its_top_or_after_bad_files_is_said(tmp_path, caplog):
    """An outside check's: images beside the class folders, a class folder named `.net` and (another's) a link to a
    class folder that is gone were left out with no word, and a class left with one image by --skip-bad was not
    said to be too small."""
    import logging

    from PIL import Image

    from training.data import load_image_folder

    for name, n in (("a", 3), ("b", 3), (".net", 2)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / name / f"{i}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.jpg")
    (tmp_path / "moved").symlink_to(tmp_path / "nowhere")  # a class folder's link whose folder is gone
    (tmp_path / "b" / "1.png").write_bytes(b"junk")
    (tmp_path / "b" / "2.png").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING):
        data = load_image_folder(tmp_path, skip_bad=True)
    assert data.classes == ("a", "b") and len(data) == 4
    for said in (
        "1 image(s) beside the class folders not read",
        "folders ['.net'] start with a dot and are no classes",
        "links ['moved'] lead to nothing and are not read",
        "class(es) ['b'] have one image once the bad files are left out",
    ):
        assert said in caplog.text, caplog.text


def test_a_train_run_that_fails_before_storing_leaves_no_new_store_folder(tmp_path, capsys):
    """An outside check's: a run that failed early left the --store folder it had made, holding only `.lock`,
    which the next command took for a store."""
    from clipbank.cli import main

    (tmp_path / "flat").mkdir()  # no class folders: refused after the store was opened
    args = ["train", "--task", "t", "--data", str(tmp_path / "flat"), "--steps", "2"]
    assert main([*args, "--store", str(tmp_path / "new")]) == 2
    assert "has no class sub-folders" in capsys.readouterr().err and not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there before is left as it was
    assert main([*args, "--store", str(tmp_path / "kept")]) == 2
    assert (tmp_path / "kept").is_dir()


def test_hidden_images_are_counted_and_long_lists_say_they_are_cut(tmp_path, caplog):
    """A hidden image in a class folder was left out without a word, and warnings named 5 of 7 classes as if
    they were all (an outside check)."""
    import logging

    from PIL import Image

    from training.data import list_image_folder

    for i in range(7):
        (tmp_path / f"c{i}").mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / f"c{i}" / "0.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "c0" / ".hidden.png")
    with caplog.at_level(logging.WARNING):
        listing = list_image_folder(tmp_path)
    assert len(listing.paths) == 7
    assert "1 files not read (1 hidden)" in caplog.text
    assert "['c0', 'c1', 'c2', 'c3', 'c4', ... 7 in all] have one image each" in caplog.text


def test_store_activate_refuses_a_version_of_another_backbone_than_the_active_tasks(tmp_path, capsys, backbone):
    """An outside check: `store activate` of a version trained on another backbone went through, and every server
    of the store took the task offline (backbone_mismatch)."""
    from clipbank.cli import main
    from model_store.bank import empty_bank
    from model_store.store import LocalStore
    from tests.helpers import edit_bundle, random_bundle

    store = LocalStore(tmp_path / "s")
    store.put(random_bundle(empty_bank(backbone), "cars", seed=1))
    other = edit_bundle(
        random_bundle(empty_bank(backbone), "vans", seed=2),
        manifest=lambda m: m["backbone"].update(fingerprint="0" * 64, arch="ViT-B-32"),
    )
    store.put(other, activate=False)
    assert main(["store", "--store", str(tmp_path / "s"), "activate", "vans", "1"]) == 2
    err = capsys.readouterr().err
    assert "backbone_mismatch" in err and "trained on another backbone (ViT-B-32" in err and "cars" in err, err
    assert LocalStore(tmp_path / "s").active() == {"cars": store.version("cars", 1).bundle_id}


def test_store_clean_deletes_leftovers_without_purging_a_task(tmp_path, capsys, backbone):
    """An outside check: `store check` counted a blob no version names and said "any purge removes such blobs":
    removing one meant purging a real task."""
    from clipbank.cli import main
    from model_store.bank import empty_bank
    from model_store.digest import bytes_digest
    from model_store.store import LocalStore
    from model_store.store_check import store_leftovers
    from tests.helpers import random_bundle

    store = LocalStore(tmp_path / "s")
    store.put(random_bundle(empty_bank(backbone), "cars", seed=1))
    whole = random_bundle(empty_bank(backbone), "vans", seed=2)  # a killed writer's whole blob: never indexed
    (store.blobs / f"{bytes_digest(whole)}.safetensors").write_bytes(whole)
    (store.blobs / ".tmp-abc").write_bytes(b"half")
    (store.blobs / "my-backup.safetensors").write_bytes(b"an operator's own file")
    assert main(["store", "--store", str(tmp_path / "s"), "check"]) == 0
    assert "`clipbank store clean` deletes them" in capsys.readouterr().err
    generation = store.generation()
    assert main(["store", "--store", str(tmp_path / "s"), "clean"]) == 0
    assert "1 temp file(s) and 1 blob(s) no version names deleted" in capsys.readouterr().out
    assert store_leftovers(tmp_path / "s") == {"temp_files": 0, "unreferenced_blobs": 0}
    assert (store.blobs / "my-backup.safetensors").exists() and store.generation() == generation
    assert store.load(store.task("cars").active).task == "cars"
    store.index_path.unlink()  # a lost index: its blobs are not strays
    assert main(["store", "--store", str(tmp_path / "s"), "clean"]) == 2
    assert "store_damaged" in capsys.readouterr().err and len(list(store.blobs.glob("*.safetensors"))) == 2

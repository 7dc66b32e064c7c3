"""A notebook user's mistakes with the Python API, each named before any training (an outside check found each
failing deep in torch, after training, or not at all)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model_store.bundle import read_bundle
from model_store.inference import ClassifyItem
from model_store.pixels import viewed_rgb
from model_store.selector import SelectorConfig
from training import LabelledImages, TrainConfig
from training.data import checked_split
from training.export import export_domain


def _images(n: int, classes=("a", "b")) -> LabelledImages:
    return LabelledImages([Image.new("RGB", (8, 8), "red")] * n, [i % len(classes) for i in range(n)], classes)


def test_a_split_with_nothing_to_train_on_or_other_validation_classes_is_refused(backbone):
    cfg = TrainConfig(task="t", val_fraction=0.99)
    with pytest.raises(ValueError, match="no training image is left once 4 are held out"):
        checked_split(_images(4), None, cfg, backbone)  # was torch's "stack expects a non-empty TensorList"
    other = _images(4, ("a", "c"))
    with pytest.raises(ValueError, match=r"not the training set's: \['b', 'c'\] are in only one"):
        checked_split(_images(6), other, TrainConfig(task="t"), backbone)  # was trained and scored on c
    reordered = LabelledImages(other.images, other.labels, ("b", "a"))
    assert len(checked_split(_images(6), reordered, TrainConfig(task="t"), backbone)[1]) == 4


def test_a_rank_no_server_would_load_is_refused_before_training(backbone):
    """TrainConfig(rank=400) on tiny trained fully, then every server refused the bundle (the rank rule)."""
    from model_store.compat import MAX_RANK_PER_WIDTH

    ceiling = MAX_RANK_PER_WIDTH * min(spec.width for spec in backbone.towers.values())
    with pytest.raises(ValueError, match=f"rank {ceiling + 1} is over .* use a rank of at most {ceiling}"):
        checked_split(_images(6), None, TrainConfig(task="t", rank=ceiling + 1), backbone)
    assert len(checked_split(_images(6), None, TrainConfig(task="t", rank=ceiling), backbone)[0]) > 0


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"label_smoothing": 1.5}, r"label_smoothing must be in \[0, 1\), got 1.5"),  # torch's error, after the start
        ({"label_smoothing": float("nan")}, "label_smoothing must be in"),  # failed when the bundle was packed
        ({"warmup": -5}, "warmup must be >= 0, got -5"),
        ({"steps": 2.5}, "steps must be an integer, got float 2.5"),
        ({"steps": "10"}, "steps must be an integer, got str '10'"),  # a TypeError from a comparison
        # an outside check: each of these failed in a comparison, naming no setting
        ({"lr": "0.01"}, "lr must be a number, got str '0.01'"),
        ({"label_smoothing": "0.1"}, "label_smoothing must be a number, got str '0.1'"),
        ({"new_first": None}, "new_first must be a number, got NoneType None"),
        ({"isolated": "yes"}, "isolated must be True or False, got str 'yes'"),
        ({"selector": 3}, "selector is a SelectorConfig or a kind's name, got int"),  # failed after every step
        ({"templates": "a {}."}, "templates is a tuple of templates, got the string 'a {}.'"),
    ],
)
def test_train_config_names_each_bad_setting_once(kw, message):
    with pytest.raises(ValueError, match=message) as e:
        TrainConfig(task="t", **kw)
    assert str(e.value).count(";") == 0  # one problem, not one per character of a string


def test_train_config_takes_numpy_numbers_and_a_selector_kind_by_name():
    """A notebook's arithmetic gives numpy numbers; `--selector gaussian` is a name on the command line, and
    `selector="gaussian"` was taken and failed with an AttributeError once the whole run had trained."""
    cfg = TrainConfig(task="t", steps=np.int64(100), lr=np.float32(0.5), selector="gaussian", isolated=np.bool_(True))
    assert (type(cfg.steps), cfg.steps, type(cfg.lr), cfg.lr) == (int, 100, float, 0.5)
    assert cfg.isolated is True and cfg.selector == SelectorConfig(kind="gaussian")
    with pytest.raises(ValueError, match="invalid SelectorConfig: kind must be one of"):
        TrainConfig(task="t", selector="gauss")


def test_images_in_memory_are_seen_as_files_and_the_server_see_them():
    """Pillow's own conversion makes dark 16-bit grey white and transparent pixels black."""
    grey16 = Image.fromarray(np.full((8, 8), 100 * 257 // 4, np.uint16))
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    data = LabelledImages([grey16, clear, Image.new("RGB", (8, 8), "red")], [0, 1, 0], ("a", "b"))
    assert [im.mode for im in data.images] == ["RGB"] * 3
    assert data.images[0].getpixel((0, 0)) == viewed_rgb(grey16).getpixel((0, 0)) == (25, 25, 25)
    assert data.images[1].getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match="32-bit float pixels"):
        LabelledImages([Image.new("F", (8, 8))], [0], ("a", "b"))


def test_read_bundle_takes_any_bytes_like_and_names_a_path(backbone):
    from model_store.bank import empty_bank
    from tests.helpers import random_bundle

    data = random_bundle(empty_bank(backbone), "cars", seed=1)
    assert read_bundle(bytearray(data)).id == read_bundle(memoryview(data)).id == read_bundle(data).id
    with pytest.raises(TypeError, match=r"not a path: read_bundle\(Path\('x.safetensors'\).read_bytes\(\)\)"):
        read_bundle("x.safetensors")


def test_classify_item_names_the_shape_it_got():
    with pytest.raises(TypeError, match=r"got Tensor\[3, 8, 8\]"):
        ClassifyItem(torch.zeros(3, 8, 8))


def test_a_domain_is_exported_only_into_a_new_or_empty_folder(tmp_path):
    (tmp_path / "keep").write_text("mine")
    with pytest.raises(ValueError, match="is not a new or empty folder: export into a new folder"):
        export_domain("shapes", tmp_path)
    with pytest.raises(ValueError, match="'' is not a new or empty folder"):
        export_domain("shapes", "")
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


def test_a_stopped_export_leaves_nothing_and_a_finished_one_is_whole(tmp_path, monkeypatch):
    """`clipbank data export` wrote its PNGs in place: Ctrl-C left a partial tree (and maybe a truncated file)."""
    saved, real = [], Image.Image.save

    def save(self, fp, *a, **k):
        if len(saved) == 30:
            raise KeyboardInterrupt
        saved.append(fp)
        return real(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(KeyboardInterrupt):
        export_domain("shapes", tmp_path / "out")
    assert len(saved) == 30 and list(tmp_path.iterdir()) == []  # nothing left, not even the hidden work folder
    monkeypatch.setattr(Image.Image, "save", real)
    (tmp_path / "out").mkdir(mode=0o750)  # an empty folder is taken, as before, with the mode it was given
    counts = export_domain("shapes", tmp_path / "out")
    assert sum(counts.values()) == len(list((tmp_path / "out").rglob("*.png")))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750 & ~_umask()  # it became 755, whatever it was
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        export_domain("shapes", tmp_path / "f")
    with pytest.raises(OSError, match="cannot export into .*f/sub"):  # was [Errno 17] File exists: 'f'
        export_domain("shapes", tmp_path / "f" / "sub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "out"]  # no work folder left


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_training_and_the_server_reduce_a_large_png_alike_and_refuse_what_a_server_refuses(tmp_path):
    """An outside check's: a 12 MP PNG took 45 MB held for training (1000 of them: 45 GB), where JPEGs are drafted;
    and training took a 91 MP image that every server with the default limits refuses (with only Pillow's
    unnamed DecompressionBombWarning)."""
    import warnings

    from service.config import Limits
    from service.images import decode_image, inspect_all
    from tests.reliability.payloads import lying_png
    from training.data import load_image_folder

    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 255, (45, 60, 3), dtype=np.uint8)).resize((2400, 1800))
    for name, fmt in (("a", "png"), ("b", "webp")):
        (tmp_path / "d" / name).mkdir(parents=True)
        picture.save(tmp_path / "d" / name / f"p.{fmt}", **({"compress_level": 1} if fmt == "png" else {}))
    ours = load_image_folder(tmp_path / "d", target=224)
    assert [im.size for im in ours.images] == [(1200, 900)] * 2  # 1800 // (4 x 224) = 2
    for i, name in enumerate(("a/p.png", "b/p.webp")):
        (opened,) = inspect_all([(name, (tmp_path / "d" / name).read_bytes())], Limits(), 224)
        assert np.array_equal(np.asarray(ours.images[i]), np.asarray(decode_image(opened)))
    assert load_image_folder(tmp_path / "d", target=None).images[0].size == (2400, 1800)
    (tmp_path / "d" / "b" / "huge.png").write_bytes(lying_png(13_000, 7_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's own warning, which names no file, is not shown
        with pytest.raises(
            ValueError,
            match=r"huge.png is 13000x7000 = 91000000 pixels; a server refuses more than "
            r"max_pixels=24000000 by default: resize it",
        ):
            load_image_folder(tmp_path / "d", target=224)


def test_training_reads_a_large_jpeg_as_the_server_decodes_it_not_at_full_size(tmp_path):
    """`clipbank train` held every photo decoded at full size (16 12-MP JPEGs: +825 MB; 1000 would need about
    48 GB), where the server decodes each at the smallest JPEG scale that keeps the backbone's input size. It now
    reads them as the server does: the same pixels, about 1/64 of the memory."""
    from service.config import Limits
    from service.images import decode_image, inspect_all
    from training.data import load_image_folder

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).resize((4000, 3000))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    photo.save(tmp_path / "a" / "p.jpg", quality=80)
    photo.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "b" / "q.JPG", quality=80)
    full = load_image_folder(tmp_path)
    ours = load_image_folder(tmp_path, target=224)
    assert [im.size for im in full.images] == [(4000, 3000), (3000, 4000)]
    assert [im.size for im in ours.images] == [(500, 375), (375, 500)]
    lazy = load_image_folder(tmp_path, lazy=True, target=224)
    for i, name in enumerate(("a/p.jpg", "b/q.JPG")):
        data = (tmp_path / name).read_bytes()
        (opened,) = inspect_all([(name, data)], Limits(), 224)
        served = np.asarray(decode_image(opened))
        assert np.array_equal(np.asarray(ours.images[i]), served)
        assert np.array_equal(np.asarray(lazy.images[i]), served)


def test_train_task_names_a_wrong_argument_before_any_step_runs(backbone):
    """An outside check of the Python API: the backbone given for the bank, a list for `val` or a dict for the
    config failed with AttributeErrors deep inside; `version=0` failed once the whole run had trained."""
    from model_store.bank import empty_bank
    from training.trainer import train_task

    bank, data, cfg = empty_bank(backbone), _images(6), TrainConfig(task="t", steps=1)
    cases = [
        ((bank, data, {"task": "t"}), {}, TypeError, "train_task's cfg is a TrainConfig"),
        ((backbone, data, cfg), {}, TypeError, r"bank is a BankSnapshot, got Backbone: empty_bank\(backbone\)"),
        ((bank, list(data.images), cfg), {}, TypeError, "train_task's train is a LabelledImages"),
        ((bank, data, cfg), {"val": [1]}, TypeError, "train_task's val is a LabelledImages"),
        ((bank, data, cfg), {"version": 0}, ValueError, r"version must be in 1\.\.\d+, got 0$"),
        ((bank, data, cfg), {"version": "2"}, TypeError, r"version is an integer \(1\.\.\d+\), got str '2'"),
        ((bank, data, cfg), {"parent": 3}, TypeError, "parent is a bundle id"),
    ]
    for args, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            train_task(*args, progress=False, **kwargs)


def test_a_class_folder_that_names_a_parent_class_otherwise_is_told_to_take_its_name():
    """An outside check: folders `Sun`, `Cloud` for a parent with `sun`, `cloud` were told "make them differ",
    which would have made a second class of each."""
    from training.lineage import over_parent_classes

    with pytest.raises(
        ValueError, match="class 'Cloud' of the data is the parent's class 'cloud' .* its folder 'cloud'"
    ):
        over_parent_classes(("cloud", "sun"), _images(4, ("Cloud", "fog")), None, 2)
    train, _, _ = over_parent_classes(("cloud", "sun"), _images(4, ("cloud", "fog")), None, 2)
    assert train.classes == ("cloud", "sun", "fog")


def test_load_image_folder_reads_quietly_when_asked(tmp_path, capsys):
    """An outside check: `train_task(progress=False)` in a notebook still showed "read images" bars, which come
    from `load_image_folder` and had no switch."""
    from training.data import load_image_folder

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(60):
            Image.new("RGB", (8, 8), "red").save(tmp_path / c / f"{i}.png")
    capsys.readouterr()
    assert len(load_image_folder(tmp_path, progress=False).images) == 120
    assert "read images" not in capsys.readouterr().err
    load_image_folder(tmp_path)
    assert "read images" in capsys.readouterr().err  # 100 files or more: the bar, by default

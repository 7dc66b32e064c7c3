"""The papers' prompts for the real protocols, read from clip_benchmark's files: per-dataset templates in our
`{}` form, cleaned class names aligned with torchvision's order, and a clear error when the package is missing."""

from __future__ import annotations

import pytest
import torch

from model_store.labels import template_ok
from training import prompts
from training.protocols import MTIL_ORDER_I
from training.scoring import class_embeddings

# torchvision's EuroSAT classes (ImageFolder: sorted folder names), with underscores read as spaces
EUROSAT_TV = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
    "Residential", "River", "SeaLake",
)  # fmt: skip


def test_every_mtil_dataset_has_a_usable_ensemble():
    for name in MTIL_ORDER_I:
        templates = prompts.paper_templates(name)
        assert templates and all(template_ok(t) for t in templates), name
        assert all("{c}" not in t for t in templates)
    assert prompts.paper_templates("mnist") == ('a photo of the number: "{}".',)
    assert prompts.paper_templates("eurosat")[0] == "a centered satellite photo of {}."
    with pytest.raises(ValueError, match="no papers' prompts for 'shapes'"):
        prompts.paper_templates("shapes")


def test_cleaned_names_follow_torchvisions_order():
    eurosat = prompts.paper_classes("eurosat", EUROSAT_TV)
    assert eurosat[0] == "annual crop land" and eurosat[-1] == "lake or sea" and len(eurosat) == 10
    # torchvision's Caltech-101 drops BACKGROUND_Google; clip_benchmark's list starts with it
    raw = tuple(f"c{i}" for i in range(101))
    caltech = prompts.paper_classes("caltech101", raw)
    assert len(caltech) == 101 and caltech[:2] == ("off-center face", "centered face") and "background" not in caltech
    assert prompts.paper_classes("mnist", tuple(f"{i} - x" for i in range(10)))[:3] == ("0", "1", "2")
    assert prompts.paper_classes("dtd", ("banded", "blotchy")) == ("banded", "blotchy")  # none cleaned: kept
    with pytest.raises(ValueError, match="eurosat: clip_benchmark has 10 class names, the data has 3"):
        prompts.paper_classes("eurosat", EUROSAT_TV[:3])


def test_missing_package_is_a_clear_error_before_any_work(monkeypatch, capsys, tmp_path):
    from clipbank.cli import main

    real = prompts.importlib.util.find_spec
    monkeypatch.setattr(prompts.importlib.util, "find_spec", lambda n: None if n == "clip_benchmark" else real(n))
    prompts._files.cache_clear()
    try:
        with pytest.raises(prompts.PromptsUnavailable, match=r"pip install 'clipbank\[papers\]'"):
            prompts.paper_templates("dtd")
        args = ["bench", "cl", "--protocol", "mtil-1", "--data-root", str(tmp_path), "--backbone", "no-such-model"]
        with pytest.raises(SystemExit, match="--prompts plain"):  # before the backbone is even looked up
            main(args)
    finally:
        monkeypatch.undo()
        prompts._files.cache_clear()
    assert prompts.paper_templates("mnist")  # found again


def test_an_ensemble_is_the_renormalised_mean_of_its_templates(backbone):
    classes, templates = ("circle", "square"), ("a photo of a {}.", "a sketch of a {}.")
    one = [class_embeddings(backbone.model, backbone, classes, t, lambda n: None) for t in templates]
    both = class_embeddings(backbone.model, backbone, classes, templates, lambda n: None)
    expected = torch.nn.functional.normalize(torch.stack(one).mean(0), dim=-1)
    assert torch.allclose(both, expected, atol=1e-6)
    assert not torch.allclose(both, one[0], atol=1e-3)


def test_a_task_trained_with_an_ensemble_serves_with_it(backbone):
    from model_store.bank import build_bank, empty_bank
    from model_store.bundle import read_bundle
    from model_store.inference import ClassifyItem, classify_batch
    from training.data import load_domain
    from training.trainer import TrainConfig, train_task

    data = load_domain("arrows", "train").subset(range(48))
    templates = prompts.paper_templates("dtd")
    cfg = TrainConfig(task="arrows", steps=2, batch_size=8, templates=templates)
    assert cfg.serving_templates == templates and TrainConfig(task="x").serving_templates == ("a photo of a {}.",)
    bundle = read_bundle(train_task(empty_bank(backbone), data, cfg, progress=False).bundle)
    assert tuple(bundle.manifest.templates) == templates
    bank = build_bank(backbone, [bundle])
    x = torch.stack([backbone.preprocess(im) for im in data.images[:2]])
    pinned = classify_batch(bank, [ClassifyItem(x, None, task="arrows", top_k=1)])[0]
    same = classify_batch(bank, [ClassifyItem(x, data.classes, task="arrows", top_k=1, templates=templates)])[0]
    assert [r.labels for r in pinned] == [r.labels for r in same]  # the bundle's ensemble is what scores it
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig(task="x", templates=("no field",))

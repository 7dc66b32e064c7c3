"""ONNX export of the frozen towers and the selectors: parity with PyTorch, caching, serving the frozen pass."""

from __future__ import annotations

import logging

import pytest
import torch

from model_store.backbone import load_backbone
from model_store.bank import build_bank, empty_bank
from model_store.bundle import read_bundle
from model_store.errors import BackboneError
from model_store.inference import ClassifyItem, classify_batch
from model_store.moe_clip import encode_image, encode_text
from model_store.onnx_runtime import PARITY_ATOL, export_selector, run_session, session, with_onnx_runtime
from model_store.selector import SelectorConfig, fit_selector, score

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def onnx_backbone(tmp_path_factory):
    """A tiny backbone of its own (the runtime is set on the object), its frozen passes in ONNX Runtime."""
    plain = load_backbone("tiny", device="cpu")
    cache = tmp_path_factory.mktemp("onnx-cache")
    bb, diffs = with_onnx_runtime(plain, cache)
    assert plain.frozen.name == "torch"  # the object passed in is not changed
    return bb, cache, diffs


def test_exported_towers_match_pytorch_within_1e_4(onnx_backbone):
    bb, _, diffs = onnx_backbone
    assert bb.frozen.name == "onnx"
    assert max(diffs.values()) <= PARITY_ATOL
    g = torch.Generator().manual_seed(5)
    images = torch.rand(5, 3, bb.image_size, bb.image_size, generator=g)  # a batch size not used in export
    tokens = bb.tokenizer(["a photo of a circle.", "stripes", "a red square on a blue background."])
    with torch.inference_mode():
        ref_i, ref_t = encode_image(bb.model, images), encode_text(bb.model, tokens)
    got_i, got_t = bb.frozen.image(images), bb.frozen.text(tokens)
    assert got_i.shape == ref_i.shape and got_t.shape == ref_t.shape
    assert float((got_i - ref_i).abs().max()) <= PARITY_ATOL
    assert float((got_t - ref_t).abs().max()) <= PARITY_ATOL


def test_exports_are_cached_by_fingerprint(onnx_backbone):
    bb, cache, _ = onnx_backbone
    (folder,) = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert folder.name.startswith(bb.fingerprint[:32])
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert set(stamps) == {"image.onnx", "text.onnx"}
    again = load_backbone("tiny", device="cpu")
    with_onnx_runtime(again, cache)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # not exported a second time


def test_a_read_only_cache_serves_its_export_and_says_when_it_has_none(onnx_backbone, tmp_path, monkeypatch):
    """A cache volume mounted read-only: its lock cannot be taken, but a complete export needs none to be read."""
    import errno

    import filelock

    _, cache, _ = onnx_backbone

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(filelock.BaseFileLock, "acquire", read_only)
    bb, diffs = with_onnx_runtime(load_backbone("tiny", device="cpu"), cache)
    assert bb.frozen.name == "onnx" and max(diffs.values()) <= PARITY_ATOL
    with pytest.raises(BackboneError, match="cannot be written .*Read-only file system.* holds no export"):
        with_onnx_runtime(load_backbone("tiny", device="cpu"), tmp_path / "empty")


def test_a_stale_or_broken_cached_export_is_made_again_and_a_mismatch_refused(tmp_path, monkeypatch):
    from model_store import onnx_runtime

    bb = load_backbone("tiny", device="cpu")
    with_onnx_runtime(bb, tmp_path)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    other = load_backbone("tiny", device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a different model under the same fingerprint: the cached export no longer matches
        other.model.visual.proj.add_(torch.randn(other.model.visual.proj.shape, generator=g))
    before = (folder / "image.onnx").stat().st_mtime_ns
    assert max(with_onnx_runtime(other, tmp_path)[1].values()) <= PARITY_ATOL  # exported again, from `other`
    assert (folder / "image.onnx").stat().st_mtime_ns != before
    (folder / "text.onnx").write_bytes(b"not an onnx file")  # a damaged cache is exported again too
    third = load_backbone("tiny", device="cpu")
    with torch.no_grad():
        third.model.visual.proj.copy_(other.model.visual.proj)
    assert max(with_onnx_runtime(third, tmp_path)[1].values()) <= PARITY_ATOL
    monkeypatch.setattr(onnx_runtime, "parity", lambda *a, **k: {"image": 1.0, "text": 0.0})
    last = load_backbone("tiny", device="cpu")
    with pytest.raises(BackboneError, match="differs from PyTorch"):
        with_onnx_runtime(last, tmp_path)
    assert last.frozen.name == "torch"
    monkeypatch.undo()  # an outside check's: an export answering NaN passed (max() skips a NaN), every answer wrong
    monkeypatch.setattr(onnx_runtime.OrtFrozen, "image", lambda self, x: torch.full((len(x), 128), float("nan")))
    with pytest.raises(BackboneError, match="differs from PyTorch by .*inf"):
        with_onnx_runtime(last, tmp_path)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(BackboneError, match="is a file, not a folder"):  # was FileExistsError, with a traceback
        with_onnx_runtime(last, tmp_path / "a-file")


@pytest.mark.parametrize("kind", ["autoencoder", "gaussian"])
def test_selector_export_matches_pytorch(tmp_path, kind):
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(60, 64, generator=g), dim=-1)
    sel = fit_selector(feats[:48], feats[48:], SelectorConfig(kind=kind, epochs=30))
    path = export_selector(sel, tmp_path / f"{kind}.onnx")
    x = torch.nn.functional.normalize(torch.randn(7, 64, generator=g), dim=-1)
    got = run_session(session(path), x)
    assert got.shape == (7,)
    assert float((got - score(sel, x)).abs().max()) <= PARITY_ATOL


def test_classification_with_the_onnx_frozen_pass_matches_pytorch(onnx_backbone, backbone):
    from benchmarks.synthetic import synthetic_bundle

    bb, _, _ = onnx_backbone
    data = synthetic_bundle(empty_bank(backbone), "synthetic", seed=3)
    torch_bank = build_bank(backbone, [read_bundle(data)])
    onnx_bank = build_bank(bb, [read_bundle(data)])
    images = torch.rand(3, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(2))
    items = [
        ClassifyItem(images, ("circle", "square", "star"), match_labels=False),
        ClassifyItem(images, None, "synthetic"),
    ]
    for a, b in zip(classify_batch(torch_bank, items), classify_batch(onnx_bank, items), strict=True):
        for ra, rb in zip(a, b, strict=True):
            assert (ra.route.task, ra.route.bundle_id) == (rb.route.task, rb.route.bundle_id)
            pa, pb = dict(ra.labels), dict(rb.labels)  # the ranking of two near-equal scores may differ
            assert pa.keys() == pb.keys() and max(abs(pa[k] - pb[k]) for k in pa) <= 1e-4


def test_a_backbone_is_never_changed_after_it_is_made(onnx_backbone):
    import dataclasses

    bb, _, _ = onnx_backbone
    with pytest.raises(dataclasses.FrozenInstanceError):
        bb.frozen = None
    torch_twin = bb.with_frozen()
    assert torch_twin.frozen.name == "torch" and bb.frozen.name == "onnx" and torch_twin.model is bb.model


def test_the_int8_image_tower_is_made_once_close_to_pytorch_and_refused_when_too_far(
    onnx_backbone, monkeypatch, caplog
):
    from model_store import onnx_runtime

    bb, cache, _ = onnx_backbone
    plain = load_backbone("tiny", device="cpu")
    with caplog.at_level(logging.INFO):
        q, parity = with_onnx_runtime(plain, cache, int8=True)
    assert "pre-processing before quantization" not in caplog.text  # ONNX Runtime's advice, logged at every start
    assert q.frozen.name == "onnx-int8" and parity["image_min_cosine"] >= onnx_runtime.INT8_MIN_COSINE
    (folder,) = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    int8 = folder / onnx_runtime.INT8_IMAGE
    assert int8.stat().st_size < (folder / "image.onnx").stat().st_size / 2  # int8 weights, not float
    stamp = int8.stat().st_mtime_ns
    images = torch.rand(3, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = encode_image(plain.model, images)
    got = q.frozen.image(images)
    assert not torch.equal(got, ref)  # really another pass...
    assert float(torch.nn.functional.cosine_similarity(got, ref).min()) >= 0.98  # ...close to the float one
    assert torch.equal(q.frozen.text(bb.tokenizer(["a cat"])), bb.frozen.text(bb.tokenizer(["a cat"])))  # text: float
    monkeypatch.setattr(onnx_runtime, "INT8_MIN_COSINE", 1.01)
    with pytest.raises(BackboneError, match="frozen_runtime=onnx"):
        with_onnx_runtime(plain, cache, int8=True)
    assert int8.stat().st_mtime_ns == stamp  # quantized once
    monkeypatch.undo()
    size = int8.stat().st_size
    with open(int8, "r+b") as f:  # truncated: it failed every start until deleted by hand
        f.truncate(5000)
    assert with_onnx_runtime(plain, cache, int8=True)[0].frozen.name == "onnx-int8"
    assert int8.stat().st_size == size  # quantized again, once

    import errno

    import filelock

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    int8.unlink()
    monkeypatch.setattr(filelock.BaseFileLock, "acquire", read_only)
    with pytest.raises(BackboneError, match="cannot be written and holds no int8 image tower"):
        with_onnx_runtime(plain, cache, int8=True)  # was FileNotFoundError 'image-inferred.onnx'


def test_onnx_runtime_writes_no_usage_events(tmp_path):
    """ONNX Runtime wrote a device id and queued usage events (OS, Python path, network kind) under the cache
    folder, in the image the store's own volume, from the first session on; set before it loads, it writes none."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = (
        "import onnx\n"
        "from onnx import TensorProto, helper\n"
        "from model_store.onnx_runtime import _require_ort\n"
        "ort = _require_ort()\n"
        "io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in 'xy']\n"
        "graph = helper.make_graph([helper.make_node('Identity', ['x'], ['y'])], 'g', io[:1], io[1:])\n"
        "model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)])\n"
        "model.ir_version = 8\n"
        "session = ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])\n"
        "assert session.run(None, {'x': [1.0]})[0].tolist() == [1.0]\n"
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(root)}, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert not list(tmp_path.rglob("*")), sorted(map(str, tmp_path.rglob("*")))

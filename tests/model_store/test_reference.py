"""Reference sets: written and read back per backbone, refused for another one; the embedded tiny set."""

from __future__ import annotations

import pytest
import torch

from model_store.errors import BackboneMismatch, ReferenceInvalid
from model_store.reference import TINY_REFERENCE, find_reference, load_reference, save_reference


def test_round_trip_and_split(tmp_path, backbone):
    emb = torch.nn.functional.normalize(torch.randn(50, backbone.embed_dim), dim=-1)
    path = save_reference(tmp_path / "ref.safetensors", emb, backbone, "random")
    ref = load_reference(path, backbone)
    assert len(ref) == 50 and ref.source == "random" and ref.fingerprint == backbone.fingerprint
    assert torch.allclose(ref.embeddings, emb, atol=2e-3)  # float16 on disk
    fit, held = ref.split(0.3)
    assert (len(fit), len(held)) == (35, 15)
    again = ref.split(0.3)
    assert torch.equal(fit, again[0]) and torch.equal(held, again[1])
    assert find_reference(backbone, path).fingerprint == backbone.fingerprint


def test_another_backbones_set_or_a_bad_file_is_refused(tmp_path, backbone):
    emb = torch.nn.functional.normalize(torch.randn(5, backbone.embed_dim), dim=-1)
    path = save_reference(tmp_path / "ref.safetensors", emb, backbone, "x")
    other = type(backbone)(**{**vars(backbone), "fingerprint": "0" * 64})
    with pytest.raises(BackboneMismatch, match="made with backbone"):
        load_reference(path, other)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ReferenceInvalid, match="cannot be read"):
        load_reference(tmp_path / "bad.safetensors", backbone)
    with pytest.raises(ValueError, match="1..50000"):
        save_reference(tmp_path / "none.safetensors", emb[:0], backbone, "x")


def test_the_embedded_tiny_reference_set_belongs_to_the_tiny_backbone(backbone):
    ref = find_reference(backbone)
    assert ref is not None and len(ref) >= 1000
    assert torch.allclose(ref.embeddings.norm(dim=-1), torch.ones(len(ref)), atol=1e-3)
    assert TINY_REFERENCE.stat().st_size < 2 * 1024 * 1024

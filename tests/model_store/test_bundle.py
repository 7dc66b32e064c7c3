"""Bundle round trip and one typed error per kind of bad bundle."""

from __future__ import annotations

import io
import json
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from model_store.bank import build_bank, empty_bank
from model_store.bundle import MANIFEST_KEY, read_bundle
from model_store.compat import check_compatible
from model_store.errors import (
    BackboneMismatch,
    BundleFormatError,
    BundleInvalid,
    BundleTampered,
    MissingExpert,
    ShapeMismatch,
)
from tests.helpers import edit_bundle, random_bundle


@pytest.fixture(scope="module")
def bundle_bytes(backbone):
    return random_bundle(empty_bank(backbone), "digits", seed=5)


def _metadata(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])["__metadata__"]


def test_round_trip(backbone, bundle_bytes):
    b = read_bundle(bundle_bytes)
    assert b.task == "digits" and b.version == 1 and len(b.id) == 64
    assert len(b.experts) == 2 * (backbone.towers["visual"].layers + backbone.towers["text"].layers)
    check_compatible(b, backbone, {})
    again = read_bundle(bytes(bundle_bytes))
    assert again.id == b.id
    for eid, p in b.experts.items():
        assert torch.equal(again.experts[eid].expert.up_w, p.expert.up_w)


def test_tampered_tensor(bundle_bytes):
    def flip(t):
        key = next(k for k in t if k.endswith("up.weight"))
        t[key] = t[key].clone()
        t[key][0, 0] += 1.0

    with pytest.raises(BundleTampered, match="experts whose content changed"):
        read_bundle(edit_bundle(bundle_bytes, tensors=flip))


def test_tampered_router_is_caught_by_content_digest(bundle_bytes):
    def flip(t):
        t["router.visual.0"] = t["router.visual.0"] + 1

    with pytest.raises(BundleTampered):
        read_bundle(edit_bundle(bundle_bytes, tensors=flip))


def test_wrong_backbone_fingerprint(backbone, bundle_bytes):
    def other(m):  # trained on a file backbone by an older release, which recorded the trainer's paths
        m["backbone"] |= {"fingerprint": "0" * 64, "arch": "/home/ann/ckpt", "pretrained": "file:/home/ann/ckpt/w.pt"}

    with pytest.raises(BackboneMismatch, match="does not match the served backbone") as e:
        check_compatible(read_bundle(edit_bundle(bundle_bytes, manifest=other)), backbone, {})
    assert "(ckpt/file:w.pt)" in str(e.value) and "/home" not in str(e.value)  # the message reaches /healthz
    for arch, pretrained, named in (("/srv/models/vit/", "/srv/secret dir/w.pt", "(vit/w.pt)"),):
        moved = {"fingerprint": "0" * 64, "arch": arch, "pretrained": pretrained}
        edited = edit_bundle(bundle_bytes, manifest=lambda m, moved=moved: m["backbone"].update(moved))
        with pytest.raises(BackboneMismatch) as e:  # the review's: a trailing slash, a space in a folder's name
            check_compatible(read_bundle(edited), backbone, {})
        assert named in str(e.value) and "srv" not in str(e.value)


def test_missing_referenced_expert(backbone):
    bank_a = build_bank(backbone, [read_bundle(random_bundle(empty_bank(backbone), "a", seed=1))])
    b = read_bundle(random_bundle(bank_a, "b", seed=2))
    assert b.uses, "b must route to a's experts for this test to mean anything"
    with pytest.raises(MissingExpert, match="does not hold"):
        check_compatible(b, backbone, {})
    with pytest.raises(MissingExpert):
        build_bank(backbone, [b])
    check_compatible(b, backbone, {e: v[:2] for e, v in bank_a.expert_ids.items()})


def test_wrong_shapes(backbone, bundle_bytes):
    b = read_bundle(bundle_bytes)
    bigger = type(backbone)(
        backbone.ref,
        backbone.model,
        backbone.preprocess,
        backbone.train_preprocess,
        backbone.tokenizer,
        backbone.device,
        backbone.fingerprint,
        {t: type(s)(s.width * 2, s.layers) for t, s in backbone.towers.items()},
    )
    with pytest.raises(ShapeMismatch, match="does not fit the backbone"):
        check_compatible(b, bigger, {})


def test_an_expert_tensor_with_no_dimensions_is_a_shape_mismatch(backbone, bundle_bytes):
    """A forged 0-d expert weight once raised IndexError (a 500 at upload), not the named 422."""
    import dataclasses

    b = read_bundle(bundle_bytes)
    eid, placed = next(iter(b.experts.items()))
    flat = dataclasses.replace(placed, expert=dataclasses.replace(placed.expert, down_w=torch.tensor(0.5)))
    with pytest.raises(ShapeMismatch, match=f"expert {eid[:12]}"):
        check_compatible(dataclasses.replace(b, experts={**b.experts, eid: flat}), backbone, {})


def test_an_expert_whose_rank_is_not_its_bundles_or_above_the_width_is_refused(backbone, bundle_bytes):
    """An outside check's: a bundle with one rank-16000 expert per block passed every check, and a batch mixing
    its images with other tasks' pads every expert to the largest rank: 11 s per request for every client, and
    5.6 GB of memory, where 0.5-0.9 s and 1.5 GB before."""
    import dataclasses

    from model_store.experts import MoEConfig

    bank = empty_bank(backbone)
    widest = 4 * min(s.width for s in backbone.towers.values())
    check_compatible(read_bundle(random_bundle(bank, "cars", seed=1, rank=widest)), backbone, {})  # as the MLP
    wide = read_bundle(random_bundle(bank, "cars", seed=1, rank=widest + 1))
    with pytest.raises(ShapeMismatch, match=rf"has rank {widest + 1}: .* at most 4 x the tower's width"):
        check_compatible(wide, backbone, {})
    b = read_bundle(bundle_bytes)
    rank = next(iter(b.experts.values())).expert.down_w.shape[0]
    other = dataclasses.replace(b, manifest=dataclasses.replace(b.manifest, moe=MoEConfig(rank=rank + 1)))
    with pytest.raises(ShapeMismatch, match=rf"has rank {rank}: .* moe.rank \({rank + 1}\)"):
        check_compatible(other, backbone, {})
    same = dataclasses.replace(b, manifest=dataclasses.replace(b.manifest, moe=MoEConfig(rank=rank)))
    check_compatible(same, backbone, {})


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"PK\x03\x04" + b"\0" * 100, "zip archive"),
        (b"\x80\x04\x95" + b"\0" * 100, "pickle"),
        (b"hello", "too short"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "a PNG image, not a clipbank bundle"),
        (struct.pack("<Q", 10**9) + b"{}", "header length"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
    ],
)
def test_not_safetensors(payload, match):
    with pytest.raises(BundleFormatError, match=match):
        read_bundle(payload)


def test_torch_save_file_is_refused():
    buf = io.BytesIO()
    torch.save({"x": torch.zeros(2)}, buf)
    with pytest.raises(BundleFormatError, match="no pickle"):
        read_bundle(buf.getvalue())


def test_plain_safetensors_without_manifest():
    with pytest.raises(BundleInvalid, match="clipbank.manifest"):
        read_bundle(st_save({"x": torch.zeros(2)}))


def test_schema_errors_are_collected(bundle_bytes):
    def bad(m):
        m["task"] = "Bad Name"
        m["version"] = 0
        m["templates"] = ["no placeholder"]

    with pytest.raises(BundleInvalid) as e:
        read_bundle(edit_bundle(bundle_bytes, manifest=bad))
    for word in ("task", "version", "templates"):
        assert word in str(e.value)


def test_selector_that_does_not_fit_the_embeddings(backbone, bundle_bytes):
    def narrow(t):
        t["selector.enc_w"] = t["selector.enc_w"][:, :7].contiguous()

    b = read_bundle(edit_bundle(bundle_bytes, tensors=narrow, fix_digest=True))
    with pytest.raises(ShapeMismatch, match="selector autoencoder"):
        check_compatible(b, backbone, {})


@pytest.mark.parametrize("change", ["int64", "nan"])
def test_non_float_or_non_finite_tensors(bundle_bytes, change):
    def spoil(t):
        w = t["router.visual.0"]
        t["router.visual.0"] = (
            w.long() if change == "int64" else w.masked_fill(torch.ones_like(w, dtype=bool), float("nan"))
        )

    with pytest.raises(BundleInvalid, match="finite float32"):
        read_bundle(edit_bundle(bundle_bytes, tensors=spoil, fix_digest=True))


@pytest.mark.parametrize("threshold", [float("inf"), True, -1.0, "1"])
def test_selector_threshold_must_be_finite_positive(bundle_bytes, threshold):
    def bad(m):
        m["selector"]["threshold"] = threshold

    with pytest.raises(BundleInvalid, match="threshold|Infinity is not a JSON number"):
        read_bundle(edit_bundle(bundle_bytes, manifest=bad))


def test_routing_ids_must_be_ids(bundle_bytes):
    def bad(m):
        m["routing"]["visual"][0] = [["not", "an", "id"]]

    with pytest.raises(BundleInvalid, match="routing"):
        read_bundle(edit_bundle(bundle_bytes, manifest=bad))


@pytest.mark.parametrize("template", ["a {} of {}", "{x} {}", "{0}{}", "{} {", "no field", "{}}"])
def test_templates_need_exactly_one_plain_field(bundle_bytes, template):
    with pytest.raises(BundleInvalid, match="templates"):
        read_bundle(edit_bundle(bundle_bytes, manifest=lambda m: m.update(templates=["a photo of a {}.", template])))


@pytest.mark.parametrize("name", ["auto", "zero-shot"])
def test_routing_modes_are_not_task_names(bundle_bytes, name):
    with pytest.raises(BundleInvalid, match="reserved"):
        read_bundle(edit_bundle(bundle_bytes, manifest=lambda m: m.update(task=name)))


def test_header_length_starting_with_the_pickle_byte_is_still_safetensors(bundle_bytes):
    """A safetensors header of 128 + 256k bytes makes the file start with 0x80, pickle's first byte."""
    meta = json.loads(_metadata(bundle_bytes)[MANIFEST_KEY])
    t = st_load(bundle_bytes)
    for pad in range(0, 400):
        meta["note"] = "x" * pad
        data = st_save(t, metadata={MANIFEST_KEY: json.dumps(meta)})
        if data[0] == 0x80:
            break
    assert data[0] == 0x80
    assert read_bundle(data).task == "digits"


def test_bundles_without_probes_still_load(backbone, bundle_bytes):
    b = read_bundle(bundle_bytes)
    assert b.probes is None
    assert build_bank(backbone, [b]).tasks[0].probes is None


def _with_probes(data: bytes, probes: torch.Tensor, key: str = "probes.embeddings") -> bytes:
    def add(t):
        t[key] = probes

    return edit_bundle(data, tensors=add, fix_digest=True)


def test_probes_round_trip_and_reach_the_bank(backbone, bundle_bytes):
    probes = torch.nn.functional.normalize(torch.randn(12, backbone.embed_dim), dim=-1)
    b = read_bundle(_with_probes(bundle_bytes, probes))
    assert torch.equal(b.probes, probes)
    check_compatible(b, backbone, {})
    assert torch.equal(build_bank(backbone, [b]).tasks[0].probes, probes)


@pytest.mark.parametrize(
    "rows, key, match",
    [
        (257, "probes.embeddings", "1 <= n <= 256"),
        (0, "probes.embeddings", "1 <= n <= 256"),
        (4, "probes.other", "unexpected tensor 'probes.other'"),
    ],
)
def test_probes_are_bounded_and_named(backbone, bundle_bytes, rows, key, match):
    with pytest.raises(BundleInvalid, match=match):
        read_bundle(_with_probes(bundle_bytes, torch.zeros(rows, backbone.embed_dim), key))


def test_probes_must_be_normalised(backbone, bundle_bytes):
    """Probes far from unit norm (finite float32, 3e38 here) once entered the store; every later training run
    on it then overflowed in its selector fit and lost its bundle at the end."""
    probes = torch.nn.functional.normalize(torch.randn(4, backbone.embed_dim), dim=-1)
    with pytest.raises(BundleInvalid, match="must be normalised embeddings"):
        read_bundle(_with_probes(bundle_bytes, probes * 3e38))
    with pytest.raises(BundleInvalid, match="must be normalised embeddings"):
        read_bundle(_with_probes(bundle_bytes, torch.zeros(4, backbone.embed_dim)))


def test_probes_of_another_width_do_not_fit(backbone, bundle_bytes):
    probes = torch.nn.functional.normalize(torch.ones(3, backbone.embed_dim + 1), dim=-1)
    b = read_bundle(_with_probes(bundle_bytes, probes))
    with pytest.raises(ShapeMismatch, match="probes.embeddings width"):
        check_compatible(b, backbone, {})


def test_names_and_dtypes_are_checked_from_the_header_before_any_tensor_is_read(bundle_bytes, monkeypatch):
    import model_store.bundle as bundle_module

    def add_evil(t):
        t["evil.payload"] = torch.zeros(3)

    def make_int(t):
        t["router.visual.0"] = t["router.visual.0"].long()

    monkeypatch.setattr(bundle_module, "st_load", lambda data: pytest.fail("a tensor was read"))
    with pytest.raises(BundleInvalid, match="unexpected tensor 'evil.payload'"):
        read_bundle(edit_bundle(bundle_bytes, tensors=add_evil, fix_digest=True))
    with pytest.raises(BundleInvalid, match="finite float32; these are not: router.visual.0"):
        read_bundle(edit_bundle(bundle_bytes, tensors=make_int, fix_digest=True))


def test_metadata_beside_the_manifest_is_refused(bundle_bytes):
    """A security check stored a bundle with 60 MB of `__metadata__["junk"]` (for each version uploaded): nothing
    refused metadata beside the manifest, bounded only by the 64 MiB header."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from model_store.bundle_format import MANIFEST_KEY

    (n,) = struct.unpack("<Q", bundle_bytes[:8])
    manifest = json.loads(bundle_bytes[8 : 8 + n])["__metadata__"][MANIFEST_KEY]
    junk = st_save(st_load(bundle_bytes), metadata={MANIFEST_KEY: manifest, "junk": "x" * 1000})
    with pytest.raises(BundleInvalid, match="unexpected safetensors metadata 'junk': a bundle's metadata holds its"):
        read_bundle(junk)
    assert read_bundle(st_save(st_load(bundle_bytes), metadata={MANIFEST_KEY: manifest})).manifest.task


def test_a_stray_selector_tensor_or_a_block_number_with_leading_zeros_is_refused(backbone, bundle_bytes):
    """A security check stored bundles with `selector.junk` (one of 248 MB, held in memory once active) and with
    `router.visual.0000`, which overwrote or was overwritten by `router.visual.0`: docs/bundle-format.md says a
    tensor outside its table is BundleInvalid."""

    def junk(t):
        t["selector.junk"] = torch.zeros(1000)

    with pytest.raises(ShapeMismatch, match=r"takes no tensor selector\.junk"):
        check_compatible(read_bundle(edit_bundle(bundle_bytes, tensors=junk, fix_digest=True)), backbone, {})

    def padded(t):
        t["router.visual.0000"] = t["router.visual.0"].clone()

    def moved(t):
        t["router.visual.00"] = t.pop("router.visual.0")

    for edit in (padded, moved):
        with pytest.raises(BundleInvalid, match=r"unexpected tensor 'router\.visual\.00"):
            read_bundle(edit_bundle(bundle_bytes, tensors=edit, fix_digest=True))

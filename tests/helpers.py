"""Builders for synthetic bundles: random experts and routers, so tests need no training run."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from model_store.backbone import TOWERS
from model_store.bank import BankSnapshot
from model_store.bundle import MANIFEST_KEY, PlacedExpert, pack_bundle, utc_now
from model_store.digest import tensor_digest
from model_store.experts import Expert, expert_id
from model_store.selector import SelectorConfig, fit_selector, selector_manifest


def random_bundle(
    bank: BankSnapshot,
    task: str,
    seed: int,
    version: int = 1,
    n_new: int = 2,
    zero_up: bool = False,
    classes: tuple[str, ...] = ("red", "blue", "green"),
    rank: int = 8,
    up_scale: float = 1.0,
) -> bytes:
    """A bundle whose new experts (of `rank`, up weights times `up_scale`) and routers are random (or, with
    zero_up, fresh: outputting 0)."""
    g = torch.Generator().manual_seed(seed)
    bb = bank.backbone
    experts, routers = {}, {}
    routing = {"top_k": 2, "scale": 0.1}
    by_slot = {v: k for k, v in bank.expert_ids.items()}
    for tower in TOWERS:
        d = bb.towers[tower].width
        routing[tower], routers[tower] = [], []
        for i in range(bb.towers[tower].layers):
            ids = [by_slot[(tower, i, s)] for s in range(len(bank.experts[tower][i]))]
            for _ in range(n_new):
                up = torch.zeros(d, rank) if zero_up else torch.randn(d, rank, generator=g) * up_scale
                e = Expert(
                    torch.randn(rank, d, generator=g) * 0.2,
                    torch.randn(rank, generator=g) * 0.1,
                    up,
                    torch.zeros(d) if zero_up else torch.randn(d, generator=g) * 0.1,
                )
                eid = expert_id(e.parts())
                experts[eid] = PlacedExpert(tower, i, e)
                ids.append(eid)
            routing[tower].append(ids)
            routers[tower].append(torch.randn(len(ids), d, generator=g))
    feats = torch.nn.functional.normalize(torch.randn(40, bb.embed_dim, generator=g), dim=-1)
    cfg = SelectorConfig(epochs=5)
    sel = fit_selector(feats[:30], feats[30:], cfg)
    manifest = {
        "task": task,
        "version": version,
        "created_at": utc_now(),
        "backbone": bb.describe(),
        "classes": list(classes),
        "templates": ["a photo of a {}."],
        "experts": {"uses": sorted({e for t in TOWERS for ids in routing[t] for e in ids} - set(experts))},
        "routing": routing,
        "selector": selector_manifest(sel, cfg),
        "training": {},
        "parent": None,
    }
    return pack_bundle(manifest, experts, routers, sel.tensors())


def with_version(data: bytes, version: int) -> bytes:
    """The same bundle re-issued as another version (same experts, routers and selector; a new bundle id)."""
    from model_store.bundle import read_bundle

    b = read_bundle(data)
    manifest = {k: v for k, v in b.manifest.to_json().items() if k not in ("format", "content_sha256")}
    manifest.update(version=version, parent=b.id)
    return pack_bundle(manifest, b.experts, b.routers, b.selector_tensors)


def png(image) -> bytes:
    """PNG bytes of a PIL image."""
    import io

    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def edit_bundle(
    data: bytes,
    manifest: Callable[[dict], None] | None = None,
    tensors: Callable[[dict], None] | None = None,
    fix_digest: bool = False,
    raw_manifest: str | None = None,
) -> bytes:
    """A bundle re-written with its manifest and/or tensors changed; with `fix_digest` the tensor digest is
    recomputed, as a careful forger would; `raw_manifest` replaces the manifest's JSON text."""
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(json.loads(data[8 : 8 + n])["__metadata__"][MANIFEST_KEY])
    t = st_load(data)
    if tensors:
        tensors(t)
    if manifest:
        manifest(meta)
    if fix_digest:
        meta["content_sha256"] = tensor_digest(t)
    return st_save(t, metadata={MANIFEST_KEY: raw_manifest if raw_manifest is not None else json.dumps(meta)})


def over_broad(data: bytes) -> bytes:
    """The same bundle with a selector so wide that it claims every image (still a valid manifest): its threshold,
    and a hybrid's gate threshold, raised with the calibration statistics they are checked against."""

    def widen(m: dict) -> None:
        from model_store.manifest import CALIBRATION_ORDER

        m["selector"]["threshold"] = 1e6
        m["selector"]["calibration"].update({k: 1e6 for k in (*CALIBRATION_ORDER, "neg_p01")})
        if m["selector"]["kind"] == "hybrid":
            m["selector"]["calibration"].update({"gate_threshold": 1e6, "gate_max": 1e6, "gate_neg_p01": 1e6})

    return edit_bundle(data, manifest=widen)


def client_on(monkeypatch, handler):
    """ClipbankClient's requests answered by `handler(request) -> httpx.Response` (no network)."""
    import httpx

    from service.client import ClipbankClient

    real = httpx._client.Client  # the class itself, even when an earlier call patched the module's name

    def patched(*a, **k):
        return real(*a, **{**k, "transport": httpx.MockTransport(handler)})

    monkeypatch.setattr(httpx, "Client", patched)
    return ClipbankClient

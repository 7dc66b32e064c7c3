"""The unclaimed-traffic monitor in the server: only auto-routed images no task claimed enter the reservoir;
`GET /insights/unclaimed` finds a stream of an untrained domain and nothing in a known one; auth, limits, off."""

from __future__ import annotations

import asyncio

import pytest

import service.watch as watch_module
from benchmarks.samples import domain_pngs, png_bytes
from model_store.modes import ZERO_SHOT
from service.clusters import find_clusters
from service.errors import Overloaded

from .conftest import AUTH, running_app

pytestmark = pytest.mark.anyio
LABELS = {"labels": ["red", "blue"]}


async def _send(c, domain: str, n: int, offset: int = 0, **data) -> list[str | None]:
    """n test images of `domain`, 16 per request; returns each image's route."""
    pngs = domain_pngs(domain, n + offset)[offset:]
    routes = []
    for a in range(0, len(pngs), 16):
        files = [("images", (f"{domain}{i}.png", p)) for i, p in enumerate(pngs[a : a + 16])]
        r = await c.post("/classify", files=files, data={**LABELS, **data})
        assert r.status_code == 200, r.text
        routes += [res["route"]["task"] for res in r.json()["results"]]
    return routes


def _classes(domain: str) -> list[str]:
    from training.domains import get_domain

    return list(get_domain(domain).classes)


async def _insights(c, **params) -> dict:
    r = await c.get("/insights/unclaimed", params=params, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


async def test_only_unclaimed_auto_images_enter_and_a_new_domain_is_found(tmp_path, backbone):
    """Empty bank: every auto image is unclaimed. Digits (foreign to the reference set of generic scenes) form a
    cluster at their share; images pinned to zero-shot are not auto traffic and are not counted."""
    async with running_app(tmp_path, backbone) as c:
        await _send(c, "digits", 32, task=ZERO_SHOT)
        empty = await _insights(c)
        assert empty["enabled"] and empty["reservoir"]["auto_images"] == 0 and empty["clusters"] == []
        await _send(c, "shapes", 96)
        await _send(c, "digits", 32)
        out = await _insights(c)
        res = out["reservoir"]
        assert (res["auto_images"], res["unclaimed"], res["embeddings"]) == (128, 128, 128)
        assert res["background"] and res["bytes"] > 0
        assert len(out["clusters"]) >= 1, out
        top = out["clusters"][0]
        assert 28 <= top["size"] <= 48 and 0.2 <= top["share"] <= 0.4, top  # digits: 32 of 128
        watch = c.app.state.service.watch  # which images: the reservoir holds shapes, then digits, in order
        (members,) = [k.members for k in find_clusters(watch.reservoir.snapshot(), None, background=watch.background)]
        assert (members >= 96).sum() >= 26 and (members >= 96).mean() > 0.6, members  # most digits, mostly digits
        assert top["nearest_task"] is None and top["margin"] is None  # no task to be near
        assert sum(share for _, share in top["over_time"]) > 0
        metrics = (await c.get("/metrics")).text
        assert "clipbank_unclaimed_reservoir_images 128.0" in metrics


async def test_known_traffic_makes_no_cluster_and_an_injected_domain_does(tmp_path, backbone, bundles):
    async with running_app(tmp_path, backbone) as c:
        for name in ("textures", "glyphs"):
            assert (await c.post("/tasks", files={"bundle": ("b", bundles[name])}, headers=AUTH)).status_code == 201
        # each domain with its own labels, as its clients send them (label-aware routing: red and blue are no task's)
        known = [r for name in ("glyphs", "textures") for r in await _send(c, name, 80, labels=_classes(name))]
        assert known.count(None) < 20, known  # the selectors claim nearly all of it
        assert (await _insights(c))["clusters"] == []
        injected = await _send(c, "digits", 40)
        out = await _insights(c)
        assert injected.count(None) >= 36 and len(out["clusters"]) == 1, out
        (cluster,) = out["clusters"]
        assert 25 <= cluster["size"] <= 40 + known.count(None) and cluster["nearest_task"] in ("textures", "glyphs")
        assert cluster["margin"] > 0  # not claimed: its nearest task's median score is above 1


async def test_a_cluster_that_labels_kept_from_its_look_alike_task_says_so(tmp_path, backbone, bundles):
    """An outside check's: glyph-like images asked about concepts no task knows went to zero-shot (label-aware
    routing), and `clipbank insights` said glyphs "claims it now: served by it since", which it never was."""
    async with running_app(tmp_path, backbone) as c:
        for name in ("textures", "glyphs"):  # glyphs uses textures' experts
            assert (await c.post("/tasks", files={"bundle": ("b", bundles[name])}, headers=AUTH)).status_code == 201
        routes = await _send(c, "glyphs", 96)  # red and blue: no task's classes
        assert routes.count(None) == 96
        out = await _insights(c)
        assert out["clusters"], out
        top = out["clusters"][0]
        assert top["nearest_task"] == "glyphs" and top["margin"] <= 0 and top["moved_by_labels"] >= 0.9, top
        unlabelled = await _send(c, "digits", 48, labels=["zebra", "okapi"], match_labels="false")
        moved = c.app.state.service.watch.reservoir.snapshot().moved
        assert len(moved) == 96 + unlabelled.count(None) and moved[:96].mean() >= 0.9
        assert unlabelled.count(None) > 0 and not moved[96:].any()  # sent by the selectors alone: not moved


async def test_the_monitor_can_be_off_and_its_endpoint_is_guarded(tmp_path, backbone):
    async with running_app(tmp_path, backbone, unclaimed_capacity=0) as c:
        await _send(c, "digits", 16)
        replica = c.app.state.service.replica  # the answer is this server's traffic
        assert await _insights(c) == {"enabled": False, "reservoir": None, "clusters": [], "replica": replica}
        assert (await c.get("/insights/unclaimed")).status_code == 401
        for params in ({"min_share": 0}, {"min_share": 2}, {"min_size": 1}, {"max_clusters": 1000}, {"min_size": "x"}):
            r = await c.get("/insights/unclaimed", params=params, headers=AUTH)
            assert r.status_code == 422, (params, r.text)
        r = await c.get("/insights/unclaimed", params={"min_share": "nan"}, headers=AUTH)  # not "<= 1"
        assert r.status_code == 422 and "min_share: Input should be a finite number" in r.text, r.text
        assert "clipbank_unclaimed_reservoir_bytes 0.0" in (await c.get("/metrics")).text
        paths = (await c.get("/openapi.json")).json()["paths"]
        for path, method in [
            ("/insights/unclaimed", "get"),
            *[("/tasks/{task}/shadow", m) for m in ("get", "post", "delete")],
        ]:
            assert paths[path][method]["security"], (path, method)  # documented as needing the token


async def test_refused_requests_are_not_counted_and_parked_ones_are_once_answered(tmp_path, backbone):
    """The reservoir counts what `clipbank_auto_images_total` counts: images of requests answered with results.
    Refused after their image passes (labels the tokenizer reads as one, too many new prompts), a client may send
    them again; a request whose large new label set is encoded a step at a time is counted when answered."""
    from service.config import Limits

    many = [f"a long label of a kind not seen before number {i}" for i in range(64)]  # parked: > inline_chars
    limits = Limits(max_request_prompts=len(many) + 8)
    async with running_app(tmp_path, backbone, limits=limits, unclaimed_thumbnails=16) as c:
        pngs = domain_pngs("digits", 4)

        async def post(labels: list[str]) -> int:
            files = [("images", (f"d{i}.png", p)) for i, p in enumerate(pngs)]
            return (await c.post("/classify", files=files, data={"labels": labels})).status_code

        assert await post(["dots", "Dots"]) == 422
        assert await post([*many, "circles", "Circles"]) == 422  # twins in a parked set
        assert await post([f"{x} {i}" for i in range(2) for x in many]) == 413
        assert (await _insights(c))["reservoir"]["auto_images"] == 0
        assert await post(many) == 200
        assert await post(["dots", "stripes"]) == 200
        assert c.app.state.service.batcher.steps.text_steps > 1  # `many` was encoded in steps
        res = (await _insights(c))["reservoir"]
        assert (res["auto_images"], res["unclaimed"]) == (8, 8)
        assert "clipbank_auto_images_total 8.0" in (await c.get("/metrics")).text
        reservoir = c.app.state.service.watch.reservoir  # the parked request's thumbnails were kept with it
        snap = reservoir.snapshot()
        assert all(t is not None for t in reservoir.thumbnails(snap.slots, snap.stamps))


async def test_one_clustering_at_a_time(tmp_path, backbone, monkeypatch):
    monkeypatch.setattr(watch_module, "CLUSTERING_WAIT_SECONDS", 0.2)
    async with running_app(tmp_path, backbone) as c:
        watch = c.app.state.service.watch
        bank = c.app.state.service.registry.bank
        with watch._clustering:  # another caller is clustering
            with pytest.raises(Overloaded):
                watch.unclaimed(bank, 0.03, 20, 20)
        async with watch._turn:  # another request is clustering, for longer than one waits
            r = await c.get("/insights/unclaimed", headers=AUTH)
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded" and "retry-after" in r.headers
        # one that ends within the wait: answered once it is done (an outside check: two dashboards and a CLI
        # call at once got two 503s, counted where the docs say to alert on overload); it waits on the event loop
        monkeypatch.setattr(watch_module, "CLUSTERING_WAIT_SECONDS", 30.0)
        await watch._turn.acquire()
        asyncio.get_running_loop().call_later(0.3, watch._turn.release)
        assert (await c.get("/insights/unclaimed", headers=AUTH)).status_code == 200
        assert watch.reservoir.nbytes == 2048 * (backbone.embed_dim * 4 + 49) + watch.reservoir.config.max_bins * 24


async def test_opt_in_thumbnails_show_a_clusters_own_images(tmp_path, backbone):
    """With `unclaimed_thumbnails`, each cluster can show its most typical images: thumbnails of the very images
    that were sent (the model's input, unnormalised). Off by default: `examples` then gives none."""
    import base64
    import io

    import numpy as np
    import open_clip
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from clipbank.watch_commands import _write_examples, plot_unclaimed

    async with running_app(tmp_path, backbone) as c:
        await _send(c, "digits", 32)
        off = await _insights(c, examples=4, min_share=0.5)
        assert off["reservoir"]["thumbnail"] == 0 and all(k["examples"] == [] for k in off["clusters"])
    async with running_app(tmp_path, backbone, unclaimed_thumbnails=32) as c:
        for bad in (-1, 17, "x"):
            assert (await c.get("/insights/unclaimed", params={"examples": bad}, headers=AUTH)).status_code == 422
        await _send(c, "shapes", 96)
        await _send(c, "digits", 32)
        out = await _insights(c, examples=4)
        assert out["reservoir"]["thumbnail"] == 32
        examples = out["clusters"][0]["examples"]
        assert len(examples) == 4 and all(u.startswith("data:image/png;base64,") for u in examples)
        shown = [np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1])))) for u in examples]
        assert all(s.shape == (32, 32, 3) for s in shown)
        sent = torch.stack([backbone.preprocess(Image.open(io.BytesIO(p))) for p in domain_pngs("digits", 32)])
        cfg = open_clip.get_model_preprocess_cfg(backbone.model)
        mean, std = (torch.tensor(cfg[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
        small = F.interpolate(sent * std + mean, size=(32, 32), mode="bilinear", antialias=True).clamp(0, 1) * 255
        small = small.permute(0, 2, 3, 1).numpy()
        for s in shown:  # each one is a digit that was sent (the cluster is the digits)
            assert np.abs(small - s.astype(np.float32)).mean(axis=(1, 2, 3)).min() < 1.0
        _write_examples(out, tmp_path / "examples")
        assert len(list((tmp_path / "examples" / "cluster-0").glob("*.png"))) == 4
        plot_unclaimed(out, str(tmp_path / "unclaimed.png"))  # the traffic plot, with a row of thumbnails
        assert Image.open(tmp_path / "unclaimed.png").height > 400


def test_a_plot_of_one_time_bin_spans_hours_not_years(tmp_path, monkeypatch):
    """With one bin, matplotlib's date axis ran from 2025 to 2029 around it."""
    from clipbank.watch_commands import plot_unclaimed
    from training.plots import pyplot

    plt = pyplot()
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    cluster = {"id": 0, "size": 40, "nearest_task": None, "over_time": [[1_796_000_000, 0.4]], "examples": []}
    plot_unclaimed({"clusters": [cluster]}, str(tmp_path / "one.png"))
    low, high = figures[0].axes[0].get_xlim()  # in days
    assert 0 < high - low <= 1 and (tmp_path / "one.png").stat().st_size > 0


def _exported(backbone, domain: str, splits=("test", "val")):
    """Normalised frozen embeddings of a domain's images as `clipbank data export` writes them (PNG)."""
    import io

    import torch
    from PIL import Image

    from training.data import load_domain

    shown = [im for split in splits for im in load_domain(domain, split).images]
    images = torch.stack([backbone.preprocess(Image.open(io.BytesIO(png_bytes(im)))) for im in shown])
    with torch.inference_mode():
        return torch.nn.functional.normalize(backbone.frozen.image(images).float(), dim=-1).numpy()


def test_a_diffuse_domain_beside_tight_ones_is_a_cluster_of_its_own(backbone):
    """An outside check sent 200 dice then 200 digits images, all unclaimed: one cluster of 399, every example a
    digit; with 200 glyphs more, two clusters, and dice (a third of the traffic) in none. Dice images lie spread
    out, touching the tight digits, though nearly every image's neighbours are its own domain's: the group is now
    cut where its neighbour graph nearly is two, and the candidates left in no group are grouped on their own."""
    import numpy as np

    from model_store.reference import find_reference
    from service.insights import ReservoirConfig, UnclaimedReservoir

    background = find_reference(backbone).embeddings.numpy()
    domains = {d: _exported(backbone, d, ("test",))[:180] for d in ("dice", "digits", "glyphs")}
    for names in (("dice", "digits"), ("dice", "digits", "glyphs")):
        x = np.concatenate([domains[d] for d in names])
        truth = np.repeat(np.arange(len(names)), 180)
        reservoir = UnclaimedReservoir(ReservoirConfig(), x.shape[1])
        reservoir.record(len(x), x)
        found = find_clusters(reservoir.snapshot(), None, 0.03, 20, 20, background)
        assert len(found) == len(names), (names, [c.size for c in found])
        for c in found:  # each cluster one domain's, and each domain found
            counts = np.bincount(truth[c.members], minlength=len(names))
            assert counts.max() >= 0.95 * c.size and counts.max() >= 150, (names, counts)
        assert {int(np.bincount(truth[c.members]).argmax()) for c in found} == set(range(len(names)))


def test_the_plot_leaves_a_gap_where_bins_had_no_auto_traffic(tmp_path, monkeypatch):
    """An outside check: a straight line ran across the hours no auto traffic came (such bins are not listed)."""
    import math

    from clipbank.watch_commands import plot_unclaimed
    from training.plots import pyplot

    plt = pyplot()
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    t = 1_796_000_000
    over = [[t, 0.1], [t + 60, 0.2], [t + 7200, 0.3]]  # a gap of two hours after the second bin
    cluster = {"id": 0, "size": 40, "nearest_task": None, "over_time": over, "examples": []}
    plot_unclaimed({"reservoir": {"bin_seconds": 60.0}, "clusters": [cluster]}, str(tmp_path / "gap.png"))
    shares = list(figures[0].axes[0].lines[0].get_ydata())
    assert shares[:2] == [10.0, 20.0] and math.isnan(shares[2]) and shares[3] == 30.0 and len(shares) == 4


def test_a_large_domain_with_sub_structure_is_one_cluster_at_the_defaults(backbone):
    """300 clock images among 840 auto-routed ones came out as the two densest leaves of their backgrounds, 103
    images (12%), the rest in no group; with --min-share 0.1, as one cluster of 300 (an outside check)."""
    from model_store.reference import find_reference
    from service.insights import ReservoirConfig, UnclaimedReservoir

    x = _exported(backbone, "clocks")
    reservoir = UnclaimedReservoir(ReservoirConfig(), x.shape[1])
    reservoir.record(840, x)
    background = find_reference(backbone).embeddings.numpy()
    for min_share in (0.03, 0.1):
        found = find_clusters(reservoir.snapshot(), None, min_share, 20, 20, background)
        assert [c.size for c in found] == [300] and abs(found[0].share - 300 / 840) < 1e-6, (min_share, found)

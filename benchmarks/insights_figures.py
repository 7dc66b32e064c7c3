"""The unclaimed-traffic monitor's figures (service/insights.py) on the tiny backbone: three tasks trained in turn
(glyphs, sketches, digits), then simulated auto-mode streams routed exactly as the server routes them
(`route_scores(task_scores(...))`). Images no task claims go into the reservoir (its defaults: 2048 embeddings, one
day, 60 s bins; 16 images per batch, 0.1 s apart); at checkpoints `find_clusters` says what it sees, with the
backbone's reference set as the background, as the server runs it.

- known-only: 2,000 images from the known domains' held-out splits (test and val): no cluster may appear;
- generic: known traffic plus 30% generic images (the reference set's generator, other images): no cluster may
  appear, however much of the traffic they are;
- diverse: known traffic plus six untrained domains at 1.5% each (each below min_share): what it shows;
- injected: 90% known + 10% of an untrained domain (textures, arrows, shapes): a cluster made mostly of that
  domain must appear within 500 images, and no other cluster; also without the reference set.

    python -m benchmarks.insights_figures                   # trains once (~18 min on 2 cores), then ~30 s
    python -m benchmarks.insights_figures --seeds 3 --steps 300 --store /tmp/clipbank-insights-store

The store is reused when it already holds the three tasks (a different --steps needs another --store).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

from model_store.backbone import Backbone, load_backbone
from model_store.bank import BankSnapshot
from model_store.inference import route_scores, task_scores
from model_store.loader import BankLoader
from model_store.reference import embed_images, find_reference
from model_store.store import LocalStore
from service.clusters import find_clusters
from service.insights import ReservoirConfig, UnclaimedReservoir
from training.data import load_domain
from training.reference_images import outside_images
from training.trainer import TrainConfig, train_task

KNOWN = ("glyphs", "sketches", "digits")
INJECTED = ("textures", "arrows", "shapes")
OTHERS = ("clutter", "dice", "clocks", "textures2", "tally", "inkarrows")  # the diverse traffic
HELD_OUT = ("test", "val")
BATCH = 16
SECONDS_PER_IMAGE = 0.1
MOSTLY = 0.5  # a cluster "is" the injected domain when more than half its members come from it


def trained_bank(backbone: Backbone, root: str, steps: int) -> BankSnapshot:
    """The known domains trained in turn into the store at `root`; tasks already there are kept."""
    store, reference = LocalStore(root), find_reference(backbone)
    for name in KNOWN:
        if name in store.active():
            continue
        start = time.perf_counter()
        cfg = TrainConfig(task=name, steps=steps)
        result = train_task(
            BankLoader(store, backbone).load(),
            load_domain(name, "train"),
            cfg,
            load_domain(name, "val"),
            progress=False,
            reference=reference,
        )
        store.put(result.bundle)
        print(f"trained {name} in {time.perf_counter() - start:.0f} s")
    return BankLoader(store, backbone).load()


@dataclass(frozen=True)
class Pool:
    """One domain's held-out images as the server sees them: frozen embeddings, and whether no task claimed them."""

    name: str
    feats: np.ndarray
    unclaimed: np.ndarray


def domain_pool(bank: BankSnapshot, name: str) -> Pool:
    """The frozen pass and the routing decision of the server, once per held-out image (routing is per image)."""
    bb, feats = bank.backbone, []
    images = [im for split in HELD_OUT for im in load_domain(name, split).images]
    for s in range(0, len(images), 128):
        x = torch.stack([bb.preprocess(im.convert("RGB")) for im in images[s : s + 128]]).to(bb.device)
        feats.append(bb.frozen.image(x).float().cpu())
    f = torch.cat(feats)
    routed, _ = route_scores(task_scores(bank, f))
    return Pool(name, f.numpy(), (routed == -1).numpy())


def generic_pool(bank: BankSnapshot, n: int = 2400, seed: int = 11) -> Pool:
    """Generic images of the tiny backbone's world (its reference set's generator, another seed), as routed."""
    f = embed_images(bank.backbone, outside_images(n, seed=seed))
    routed, _ = route_scores(task_scores(bank, f))
    return Pool("generic", f.numpy(), (routed == -1).numpy())


def stream(known: list[Pool], extra: list[tuple[Pool, float]], n: int, seed: int) -> list[tuple[Pool, int]]:
    """`n` images: each from an `extra` pool with its share, else from a known pool drawn evenly. Every pool is
    shuffled and reused only once it runs out."""
    rng = np.random.default_rng(seed)
    orders: dict[str, list[int]] = {}
    edges = np.cumsum([share for _, share in extra])

    def draw(pool: Pool) -> tuple[Pool, int]:
        if not orders.get(pool.name):
            orders[pool.name] = rng.permutation(len(pool.feats)).tolist()
        return pool, orders[pool.name].pop()

    out = []
    for _ in range(n):
        k = int(np.searchsorted(edges, rng.random(), side="right"))
        out.append(draw(extra[k][0] if k < len(extra) else known[rng.integers(len(known))]))
    return out


@dataclass(frozen=True)
class Monitor:
    """What `find_clusters` is given on the server: the selectors' scores, and the reference set (or not)."""

    bank: BankSnapshot
    background: np.ndarray | None

    def score(self, e: np.ndarray) -> tuple[list[str], np.ndarray]:
        return list(self.bank.task_names), task_scores(self.bank, torch.from_numpy(e)).numpy()


def run_stream(items: list[tuple[Pool, int]], monitor: Monitor, every: int, injected: str | None) -> list[dict]:
    """Feed `items` in batches of BATCH (cut at checkpoints), and cluster the reservoir every `every` images.
    Each cluster's `top`: the domain most of its members come from, and their share."""
    dim = monitor.bank.backbone.embed_dim
    reservoir, tags = UnclaimedReservoir(ReservoirConfig(), dim), []  # tags: each unclaimed image's domain
    cuts = sorted(set(range(BATCH, len(items), BATCH)) | set(range(every, len(items) + 1, every)) | {len(items)})
    rows, a = [], 0
    for b in cuts:
        batch = [(p, i) for p, i in items[a:b] if p.unclaimed[i]]
        feats = np.stack([p.feats[i] for p, i in batch]) if batch else np.zeros((0, dim), np.float32)
        reservoir.record(b - a, feats, now=b * SECONDS_PER_IMAGE)
        tags += [p.name for p, _ in batch]
        a = b
        if b % every and b != len(items):
            continue
        snap = reservoir.snapshot(now=b * SECONDS_PER_IMAGE)
        kept, clusters = np.array(tags[len(tags) - len(snap) :]), []
        for c in find_clusters(snap, monitor.score, background=monitor.background):
            names, counts = np.unique(kept[c.members], return_counts=True)
            top = (str(names[counts.argmax()]), float(counts.max() / c.size))
            clusters.append({**c.to_json(), "top": top, "injected": top[0] == injected and top[1] > MOSTLY})
        rows.append({"images": b, "reservoir": len(snap), "clusters": clusters})
    return rows


def _shown(clusters: list[dict]) -> str:
    return ", ".join(f"{c['size']} ({c['share']:.1%}, {c['top'][0]} {c['top'][1]:.0%})" for c in clusters) or "none"


def background_runs(
    known: list[Pool], generic: Pool, others: list[Pool], monitor: Monitor, seeds: int, n: int = 2000
) -> None:
    """Known-only traffic, known plus 30% generic images, then known plus the `others` at 1.5% each: clusters at
    500, 1000, 1500, 2000 images."""
    scenarios = (
        ("known-only traffic", []),
        ("known + 30% generic images", [(generic, 0.3)]),
        ("known + six untrained domains at 1.5% each", [(p, 0.015) for p in others]),
    )
    for title, extra in scenarios:
        print(f"\n### {title}: clusters (members, share, main domain) at each checkpoint\n")
        print("| seed | 500 | 1000 | 1500 | 2000 | reservoir at 2000 |\n| --- | --- | --- | --- | --- | --- |")
        for seed in range(seeds):
            rows = run_stream(stream(known, extra, n, seed), monitor, 500, None)
            print(f"| {seed} | {' | '.join(_shown(r['clusters']) for r in rows)} | {rows[-1]['reservoir']} |")


def _found(rows: list[dict]) -> tuple[str, str, str]:
    """When the injected domain's cluster first appeared (and what it was), and when any other cluster did."""
    hits = [(r, c) for r in rows for c in r["clusters"] if c["injected"]]
    others = [r["images"] for r in rows for c in r["clusters"] if not c["injected"]]
    if not hits:
        return "never", "-", f"{len(set(others))} checkpoints, first at {others[0]}" if others else "none"
    r, c = hits[0]
    then = f"{c['size']}, {c['share']:.1%}, {c['top'][1]:.0%}, {c['nearest_task']}, {c['margin']:+.1f}"
    return str(r["images"]), then, f"{len(set(others))} checkpoints, first at {others[0]}" if others else "none"


def injected_runs(known: list[Pool], extra: list[Pool], monitors: list[Monitor], seeds: int, n: int = 2000) -> None:
    print(f"\n### 90% known + 10% injected domain, checkpoints every 50 images up to {n}\n")
    print(
        "| domain | seed | found at (images) | cluster then: size, share, purity, nearest task, margin | "
        "other clusters (up to 2000) | without reference set: found at | other clusters |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for pool in extra:
        for seed in range(seeds):
            items = stream(known, [(pool, 0.10)], n, seed)
            cells = [_found(run_stream(items, m, 50, pool.name)) for m in monitors]
            print(f"| {pool.name} | {seed} | {' | '.join(cells[0])} | {cells[1][0]} | {cells[1][2]} |")


def cluster_seconds(background: bool, n: int = 4096, dim: int = 512, repeats: int = 3) -> float:
    """Median seconds of `find_clusters` on a full reservoir of n random normalised embeddings, a fifth of them in
    one blob, with `background` as many random rows of a reference set, or none."""
    rng = np.random.default_rng(0)

    def rows(k: int) -> np.ndarray:
        return rng.standard_normal((k, dim)).astype(np.float32)

    x, bg = rows(n), rows(n)
    x[: n // 5] = rng.standard_normal(dim) + 0.5 * rows(n // 5)
    x, bg = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (x, bg))
    reservoir = UnclaimedReservoir(ReservoirConfig(capacity=n), dim)
    for s in range(0, n, BATCH):
        reservoir.record(4 * BATCH, x[s : s + BATCH], now=s * SECONDS_PER_IMAGE)
    snap, times = reservoir.snapshot(now=n * SECONDS_PER_IMAGE), []
    for _ in range(repeats):
        start = time.perf_counter()
        found = find_clusters(snap, None, background=bg if background else None)
        times.append(time.perf_counter() - start)
    assert [c.size for c in found] == [n // 5], [c.size for c in found]
    return float(np.median(times))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps per known domain")
    p.add_argument("--seeds", type=int, default=3, help="streams per scenario")
    p.add_argument("--store", default="/tmp/clipbank-insights-store", help="store of the trained tasks (reused)")
    p.add_argument("--injected", default=",".join(INJECTED), help="untrained domains to inject")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    backbone = load_backbone("tiny", "cpu")
    bank = trained_bank(backbone, args.store, args.steps)
    known = [domain_pool(bank, name) for name in KNOWN]
    extra = [domain_pool(bank, name) for name in args.injected.split(",") if name]
    others = [domain_pool(bank, name) for name in OTHERS]
    print("| domain | held-out images | unclaimed (to zero-shot) |\n| --- | --- | --- |")
    for pool in {p.name: p for p in known + extra + others}.values():  # a domain injected and diverse: one row
        print(f"| {pool.name} | {len(pool.feats)} | {pool.unclaimed.mean():.1%} |")
    reference = find_reference(backbone).embeddings.numpy()
    monitors = [Monitor(bank, reference), Monitor(bank, None)]
    background_runs(known, generic_pool(bank), others, monitors[0], args.seeds)
    injected_runs(known, extra, monitors, args.seeds)
    for bg in (True, False):
        print(
            f"\nfind_clusters, 4096 x 512, {'4096 reference rows' if bg else 'no reference'}: "
            f"{cluster_seconds(bg):.2f} s"
        )


if __name__ == "__main__":
    main()

"""What a version in shadow costs (docs/safety.md): one server with a bank of tasks, all-auto traffic at 16
clients, in alternating rounds without and with a version in shadow (ABBA order, so a drift in the machine's
speed hits both alike). `clipbank bench serve` runs the same rounds on its largest bank.

    python -m benchmarks.shadow_cost                       # tiny, 10 tasks, 4 rounds of 15 s each way: ~3 minutes
    python -m benchmarks.shadow_cost --tasks 10 --rounds 6 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from service.client import ClipbankClient

from .process import server_process
from .serve import TOKEN, ServeBenchConfig, _level, _zero_shot_factory


def shadow_rounds(url: str, shadow_task: str, cfg: ServeBenchConfig, rounds: int) -> list[dict[str, Any]]:
    """Rounds of all-auto load at `cfg.key_concurrency` clients with `shadow_task` v1 in shadow and without."""
    rows = []
    with ClipbankClient(url, TOKEN) as client:
        for r in range(rounds):
            for on in (False, True) if r % 2 == 0 else (True, False):
                if on != (client.task(shadow_task)["shadow_version"] is not None):
                    client.set_shadow(shadow_task, 1 if on else None)
                before = client.shadow(shadow_task)["images"] if on else 0
                row = _level(url, _zero_shot_factory(cfg), cfg.key_concurrency, cfg, server="clipbank", mode="auto")
                if on:  # it really scored the round's images
                    row["shadow_images_scored"] = client.shadow(shadow_task)["images"] - before
                rows.append({**row, "shadow": on, "round": r})
    return rows


def shadow_ratio(rows: list[dict[str, Any]]) -> float | None:
    """The median over rounds of throughput with a version in shadow over throughput without, each round's two
    sides measured back to back (a drift in the machine's speed over the run cancels out)."""
    by_round: dict[int, dict[bool, float]] = {}
    for r in rows:
        by_round.setdefault(r["round"], {})[r["shadow"]] = r["images_per_s"]
    ratios = [sides[True] / sides[False] for sides in by_round.values() if len(sides) == 2 and sides[False] > 0]
    return round(statistics.median(ratios), 3) if ratios else None


def direct_cost(backend_bundles: list[bytes], ref: str, batch: int = 16, repeats: int = 30) -> dict[str, float]:
    """In process, on one thread: seconds of a batch's image passes (frozen, selectors, adapted) against seconds
    of what watching it adds (the shadow's score and would-be routes, its counts, the reservoir), medians."""
    import dataclasses
    import time

    import torch

    from model_store.backbone import load_backbone
    from model_store.bank import build_bank, shadow_entry
    from model_store.bundle import read_bundle
    from model_store.inference import ClassifyItem, ImagePasses
    from service.insights import ReservoirConfig
    from service.metrics import Metrics
    from service.watch import TrafficWatch

    bb = load_backbone(ref, "cpu")
    parsed = [read_bundle(d) for d in backend_bundles]
    bank = build_bank(bb, parsed[:-1])
    bank = dataclasses.replace(bank, shadows=(shadow_entry(parsed[-1], bb.device),))
    watch = TrafficWatch(Metrics())
    watch.start_monitor(ReservoirConfig(), bb, None)
    watch.swapped(bank)
    images = torch.rand(batch, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(0))
    passes_s, watch_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        passes = ImagePasses(
            bank, [ClassifyItem(images[k : k + 1], ("a", "b"), match_labels=False) for k in range(batch)]
        )
        passes.step(1 << 30)
        passes.step(1 << 30)
        t1 = time.perf_counter()
        watch(passes)
        passes_s.append(t1 - t0)
        watch_s.append(time.perf_counter() - t1)
    p, w = statistics.median(passes_s), statistics.median(watch_s)
    return {
        "batch_images": batch,
        "passes_ms": round(1000 * p, 3),
        "watch_ms": round(1000 * w, 3),
        "ratio": round(w / p, 4),
    }


def main(argv: list[str] | None = None) -> None:
    from .serve_run import default_images, prepare_backend

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--tasks", type=int, default=10, help="active tasks in the bank")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=15.0, help="seconds per round and side")
    p.add_argument("--out", default="runs/shadow-cost", help="report.json goes here")
    args = p.parse_args(argv)
    backend = prepare_backend(args.backbone, args.backbone, args.tasks + 1)
    cfg = ServeBenchConfig(images=default_images(), requests=100_000, max_seconds=args.seconds)
    server_args = ("--backbone", args.backbone, "--log-level", "warning")
    env = {"CLIPBANK_ADMIN_TOKEN": TOKEN}
    with tempfile.TemporaryDirectory() as tmp, server_process(Path(tmp), server_args, env) as (url, _):
        with ClipbankClient(url, TOKEN) as client:
            for data in backend.bundles[: args.tasks]:
                client.push(data, force=True)
            client.push(backend.bundles[args.tasks], mode="shadow")
        rows = shadow_rounds(url, backend.task_names[args.tasks], cfg, args.rounds)
    ratio = shadow_ratio(rows)
    direct = direct_cost(backend.bundles, args.backbone)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "backbone": args.backbone,
        "tasks": args.tasks,
        "clients": cfg.key_concurrency,
        "ratio": ratio,
        "direct": direct,
    }
    (out / "report.json").write_text(json.dumps({**report, "rows": rows}, indent=2))
    print("| round | shadow | images/s | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['round']} | {'on' if r['shadow'] else 'off'} | {r['images_per_s']} | {r['p50_ms']} | {r['p99_ms']} |"
        )
    print(f"\nwith a version in shadow / without (median of rounds, {args.tasks} tasks, 16 clients): {ratio}")
    print(
        f"in process, a batch of {direct['batch_images']}: image passes {direct['passes_ms']} ms, watching it "
        f"(shadow + reservoir) {direct['watch_ms']} ms: {direct['ratio']:.2%}"
    )


if __name__ == "__main__":
    main()

"""The interference gate's figures (docs/safety.md): what it says about tasks trained in turn, and what one report
costs at a given bank size.

    python -m benchmarks.gate_figures                       # 5 offline domains, 300 steps each: ~4 minutes
    python -m benchmarks.gate_figures --steps 20 --tasks 10
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch

from model_store.backbone import Backbone, load_backbone
from model_store.bank import build_bank, empty_bank
from model_store.bundle import read_bundle
from model_store.bundle_format import PROBES_KEY
from model_store.gate import GateLimits, interference
from model_store.loader import BankLoader
from model_store.reference import find_reference
from model_store.store import LocalStore
from training.data import load_domain
from training.trainer import TrainConfig, train_task

from .synthetic import synthetic_bundle

DOMAINS = ("textures", "glyphs", "sketches", "digits", "arrows")


def trained_figures(backbone: Backbone, domains: tuple[str, ...], steps: int) -> list[dict]:
    """Each domain trained on top of the previous ones, then the gate's report on the bank it joins."""
    reference = find_reference(backbone)
    store, rows = LocalStore(tempfile.mkdtemp(prefix="clipbank-gate-")), []
    for name in domains:
        bank = BankLoader(store, backbone).load()
        cfg = TrainConfig(task=name, steps=steps)
        result = train_task(
            bank, load_domain(name, "train"), cfg, load_domain(name, "val"), progress=False, reference=reference
        )
        store.put(result.bundle)
        report = interference(BankLoader(store, backbone).load(), name, reference.embeddings, GateLimits())
        rows.append({**report.to_json(), "trainer_warnings": result.report["routing"].get("warnings", [])})
    return rows


def report_seconds(backbone: Backbone, tasks: int, repeats: int = 5) -> float:
    """Median seconds of one report at `tasks` tasks, each with a full probe set (the most a bundle holds)."""
    bank = empty_bank(backbone)
    bundles = [read_bundle(synthetic_bundle(bank, f"t{k}", seed=k)) for k in range(tasks)]
    bank = build_bank(backbone, bundles)
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(256, backbone.embed_dim, generator=g) for _ in bank.tasks]  # 256 rows: PROBES_KEY's cap
    bank = dataclasses.replace(
        bank, tasks=tuple(dataclasses.replace(t, probes=p) for t, p in zip(bank.tasks, full, strict=True))
    )
    reference = find_reference(backbone).embeddings
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        interference(bank, bank.tasks[-1].name, reference, GateLimits())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps per domain")
    p.add_argument("--domains", default=",".join(DOMAINS), help="offline domains, trained in this order")
    p.add_argument("--tasks", type=int, default=10, help="bank size of the cost measurement")
    args = p.parse_args(argv)
    backbone = load_backbone("tiny", "cpu")
    print("| task | self_claim | stolen (largest) | zero_shot_captured | gate | trainer warnings |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in trained_figures(backbone, tuple(args.domains.split(",")), args.steps):
        worst = max(r["stolen"].items(), key=lambda kv: kv[1], default=("-", 0.0))
        print(
            f"| {r['task']} | {r['self_claim']} | {worst[0]} {worst[1]} | {r['zero_shot_captured']} | "
            f"{'passed' if r['passed'] else 'refused'} | {len(r['trainer_warnings'])} |"
        )
    print(
        f"one report at {args.tasks} tasks ({PROBES_KEY}: 256 rows each): {report_seconds(backbone, args.tasks):.4f} s"
    )


if __name__ == "__main__":
    main()

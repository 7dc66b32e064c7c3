"""`clipbank bench serve`, the shared frozen prefix: auto-mode throughput with experts in the top K blocks of each
tower, K in {L, L/2, L/4}, one server per K, measured in alternating rounds beside zero-shot."""

from __future__ import annotations

import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from model_store.backbone import Backbone
from service.client import ClipbankClient
from training.expert_blocks import compared_values

from .process import server_process
from .serve import PAIRED_ROUNDS, TOKEN, ServeBenchConfig, _auto_factory, _level, _push, _zero_shot_factory


def prefix_rows(label: str, ref: str, bb: Backbone, cfg: ServeBenchConfig) -> list[dict[str, Any]]:
    """Per K, a server holding `cfg.auto_tasks` synthetic bundles with experts in the top K blocks; rounds of
    auto traffic on each (at the key concurrency), and of zero-shot on the first, alternating."""
    from .serve_run import prepare_backend

    layers = bb.towers["visual"].layers
    ks = compared_values(layers)
    backends = {k: prepare_backend(f"{label} K={k}", ref, cfg.auto_tasks, k, bb) for k in ks}
    args = ("--backbone", ref, "--log-level", "warning", "--frozen-runtime", "torch", *cfg.server_args)
    half = ServeBenchConfig(**{**vars(cfg), "max_seconds": cfg.max_seconds / 2, "requests": cfg.requests // 2})
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        urls = {}
        for k, backend in backends.items():
            env = {"CLIPBANK_ADMIN_TOKEN": TOKEN, **cfg.env}
            urls[k], _ = stack.enter_context(server_process(Path(tmp) / f"k{k}", args, env))
            with ClipbankClient(urls[k], TOKEN) as client:
                for i, data in enumerate(backend.bundles):
                    _push(client, data, i, cfg.images[0])
        print(f"{label}: shared frozen prefix, K in {ks} of {layers}", file=sys.stderr, flush=True)
        zero_shot = _zero_shot_factory(cfg)
        for r in range(PAIRED_ROUNDS + 1):  # round 0 warms each server up and is not kept
            tag = {"server": "clipbank", "runtime": "torch", "of_layers": layers, "round": r}
            row = _level(urls[ks[0]], zero_shot, cfg.key_concurrency, half, **tag, mode="zero-shot", tasks=0)
            rows.append({**row, "expert_blocks": None})
            for k in ks if r % 2 == 0 else ks[::-1]:
                make = _auto_factory(cfg, backends[k].traffic)
                row = _level(urls[k], make, cfg.key_concurrency, half, **tag, mode="auto", tasks=cfg.auto_tasks)
                rows.append({**row, "expert_blocks": k})
    return [r for r in rows if r["round"] > 0]


def prefix_ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """auto_vs_zero_shot_k{K}: the median auto throughput with K over the median zero-shot one (same rounds)."""
    zs = [r["images_per_s"] for r in rows if r["mode"] == "zero-shot"]
    out: dict[str, float | None] = {}
    for k in dict.fromkeys(r["expert_blocks"] for r in rows if r["mode"] == "auto"):
        auto = [r["images_per_s"] for r in rows if r["mode"] == "auto" and r["expert_blocks"] == k]
        out[f"auto_vs_zero_shot_k{k}"] = round(statistics.median(auto) / statistics.median(zs), 3) if zs else None
    return out

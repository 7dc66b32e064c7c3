"""`clipbank bench cl` in parts that run side by side.

Per seed, the MoE bank, the one-adapter-per-task bank, the sequential baselines, the class-incremental protocol
and the long routing sequence are independent of one another. Each is a part: the parts run in `workers`
processes (spawned, each with its share of the cores as compute threads), and each seed's parts merge into that
seed's report. A part seeds torch's global generator itself, so its figures depend neither on the process that
ran it nor on what ran before it; with one worker the parts run one after the other in this process, with the
same figures up to the float rounding of another thread count.

Why processes: at the tiny backbone's sizes, a second compute thread speeds a training step up by about 1.5x,
while a second process on its own core doubles the work done; two one-thread processes do 1.3x the work of one
two-thread process (docs/benchmarks/cl.md).
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any

import numpy as np
import torch

from model_store.backbone import Backbone, load_backbone

from .cl_common import CLConfig
from .progress import LOG_SECONDS, progress_bar

MAX_WORKERS = 4  # each worker holds its own backbone and domains
BANK_PARTS = {  # part -> the methods it trains (zero-shot rides along with every part that runs a sequence)
    "moe": ("moe-oracle", "moe-ddas", "moe-gauss", "moe-ddas-warm"),
    "adapter-ddas": ("adapter-ddas",),
    "sequential": ("finetune", "wise-ft", "adapter"),
}
PART_SEED = {"moe": 0, "adapter-ddas": 1, "sequential": 2, "cil": 3, "routing": 4}
# relative cost on the tiny backbone (seconds of one seed, 2026-12-03): the largest parts start first
PART_COST = {"moe": 500, "adapter-ddas": 330, "sequential": 350, "cil": 175, "routing": 60}


@dataclasses.dataclass(frozen=True)
class Part:
    seed_index: int
    name: str
    cfg: CLConfig  # the seed's config, its methods narrowed to the part's


def workers_for(asked: int | None, backbone: Backbone) -> int:
    """`asked`, or up to MAX_WORKERS processes on a CPU, one per core; one on a GPU (the parts would share it: the
    backbone's resolved device, so `--device auto` counts too), and one for random weights (a worker would draw
    other ones)."""
    if backbone.ref.weights is None:
        return 1
    if asked is not None:
        return asked
    return 1 if backbone.device.type == "cuda" else max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def plan_parts(configs: Sequence[CLConfig], routing: bool, class_incremental: bool) -> list[Part]:
    """Every seed's parts, the costliest first (longest-first keeps the workers busy to the end)."""
    parts = []
    for i, c in enumerate(configs):
        for name, methods in BANK_PARTS.items():
            mine = tuple(m for m in c.methods if m in methods)
            if mine or (name == "moe" and c.expert_blocks_sweep):
                zero = ("zero-shot",) if "zero-shot" in c.methods else ()
                keep = name == "moe"  # the K sweep and the int8 comparison go with the MoE bank
                narrowed = dataclasses.replace(
                    c,
                    methods=zero + mine,
                    expert_blocks_sweep=c.expert_blocks_sweep if keep else (),
                    int8=c.int8 and keep,
                )
                parts.append(Part(i, name, narrowed))
        parts += [Part(i, n, c) for n, on in (("cil", class_incremental), ("routing", routing)) if on]
    return sorted(parts, key=lambda p: -PART_COST[p.name])


def seeded(part: Part) -> None:
    """Every generator a part may draw from, seeded by the seed's config and the part alone."""
    seed = part.cfg.seed * 10 + PART_SEED[part.name]
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def merge_reports(reports: Sequence[dict[str, Any]], cfg: CLConfig) -> dict[str, Any]:
    """The parts' `run_continual` reports of one seed as one: each key's non-empty value, dicts key by key,
    `config` the seed's own. A part's own `seconds.total` is left out: the seed's is every part's time in its
    process (`cl_job.run_offline_cl`), the parts that are no `run_continual` included."""
    out: dict[str, Any] = {}
    for r in reports:
        out = _merged(out, r)
    out["config"] = dataclasses.asdict(cfg)
    out["seconds"] = {k: v for k, v in out.get("seconds", {}).items() if k != "total"}
    return out


def _merged(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _merged(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in {**a, **b}}
    return b if a in (None, [], {}) else a


# ----------------------------------------------------------------------------------------------- running


RunPart = Callable[[Part, Backbone], Any]
_BACKBONES: dict[tuple[str, str], Backbone] = {}  # a worker's backbone, loaded once for all its parts


def _in_worker(run_part: RunPart, part: Part, backbone: dict[str, str], device: str, threads: int) -> tuple[Any, float]:
    torch.set_num_threads(threads)
    key = (backbone["ref"], device)
    if key not in _BACKBONES:
        _BACKBONES[key] = load_backbone(backbone["ref"], device)
    if _BACKBONES[key].fingerprint != backbone["fingerprint"]:
        raise RuntimeError(f"a worker loaded other weights for {backbone['ref']!r} than the parent process")
    seeded(part)
    start = time.perf_counter()
    return run_part(part, _BACKBONES[key]), time.perf_counter() - start


def run_parts(
    parts: Sequence[Part], run_part: RunPart, backbone: Backbone, device: str, workers: int, progress: bool
) -> list[Any]:
    """`run_part(part, backbone)` for every part, in `workers` processes (in this one when 1); the results in the
    order of `parts`. `run_part` must be picklable (a module-level function, or a partial of one)."""
    bar = progress_bar(total=len(parts), desc=f"bench cl ({workers} processes)", unit="part", disable=not progress)
    results: list[Any] = [None] * len(parts)
    if workers <= 1:
        for i, part in enumerate(parts):
            seeded(part)
            results[i] = run_part(part, backbone)
            bar.update()
        bar.close()
        return results
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    ref = {"ref": backbone.ref.text, "fingerprint": backbone.fingerprint}
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    try:
        pending: dict[Future, int] = {
            pool.submit(_in_worker, run_part, p, ref, device, threads): i for i, p in enumerate(parts)
        }
        while pending:  # a line at least every LOG_SECONDS where lines are held back: a part takes minutes (an
            done, _ = wait(pending, LOG_SECONDS, FIRST_COMPLETED)  # outside check saw "0/5" alone for 10 minutes)
            if not done:
                bar.refresh()
            for f in done:
                i = pending.pop(f)
                results[i], seconds = f.result()
                bar.set_postfix_str(f"{parts[i].name} of seed {parts[i].seed_index}: {seconds:.0f} s", refresh=False)
                bar.update()
    except BaseException:  # Ctrl-C, SIGTERM, a part that failed: the other parts stop now, not when they are done
        _stop(pool)
        raise
    pool.shutdown()
    bar.close()
    return results


def _stop(pool: ProcessPoolExecutor) -> None:
    """End `pool` at once: queued parts cancelled, running ones killed (an interrupted run went on for an hour,
    its workers training parts whose results nothing would read)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # no public way to stop a running one
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(5)

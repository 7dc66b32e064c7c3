"""The server beside another busy process: throughput of each thread setting, idle and with a CPU hog.

    python -m benchmarks.contention [--backbone tiny|vit-b-32] [--rounds 2] [--out rows.json]

One server per variant, one after the other, each on its own store with the same 3 synthetic tasks: a thread per
usable CPU with OpenMP's workers sleeping between regions (`OMP_WAIT_POLICY=PASSIVE`, what `clipbank serve` sets),
the same with GNU OpenMP's own wait policy (`OMP_WAIT_POLICY=` empty: they spin first), and one thread per pass.
The shipped default is the first for a backbone wider than 256 (ViT-B), the third for tiny
(`service/threads.py`). In each round every variant takes
zero-shot and really auto-routed load (4 clients) twice: alone, then beside a Python busy loop (`while True:
pass`, one core's worth of work from another process). It prints the median throughput and p99 of each cell, and
for each variant the ratio hog / idle. docs/benchmarks/serve.md, "Threads", has a run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from service.client import ClipbankClient
from service.threads import usable_cpus

from .process import server_process
from .serve import TOKEN, ServeBenchConfig, _auto_factory, _level, _push, _zero_shot_factory
from .serve_run import VIT_B, default_images, prepare_backend, random_checkpoint

ALL_CPUS = str(usable_cpus())
VARIANTS = {
    "passive-all-cpus": {"CLIPBANK_THREADS": ALL_CPUS},
    "gomp-wait-all-cpus": {"CLIPBANK_THREADS": ALL_CPUS, "OMP_WAIT_POLICY": ""},
    "one-thread": {"CLIPBANK_THREADS": "1"},
}
TASKS = 3
CLIENTS = 4


def _rows_of(url: str, backend: Any, cfg: ServeBenchConfig, name: str, rounds: int) -> list[dict[str, Any]]:
    with ClipbankClient(url, TOKEN) as client:
        for i in range(TASKS):
            _push(client, backend.bundles[i], i, cfg.images[0])
    makes = {"zero-shot": _zero_shot_factory(cfg), "auto": _auto_factory(cfg, backend.traffic[:TASKS])}
    for mode, make in makes.items():  # uncounted: first passes, text cache
        _level(url, make, CLIENTS, cfg, server=f"{name} (warm-up)", mode=mode)
    rows = []
    for r in range(rounds):
        for hog in (False, True):
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if hog else None
            try:
                for mode, make in makes.items():
                    row = _level(url, make, CLIENTS, cfg, server=name, mode=mode, tasks=TASKS)
                    rows.append({**row, "variant": name, "hog": hog, "round": r})
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        for mode in ("zero-shot", "auto"):
            cell = {}
            for hog in (False, True):
                mine = [r for r in rows if r["variant"] == name and r["mode"] == mode and r["hog"] == hog]
                cell["hog" if hog else "idle"] = {
                    "images_per_s": round(statistics.median(r["images_per_s"] for r in mine), 1),
                    "p99_ms": round(statistics.median(r["p99_ms"] for r in mine), 1),
                }
            ratio = cell["hog"]["images_per_s"] / max(cell["idle"]["images_per_s"], 1e-9)
            out.append({"variant": name, "mode": mode, **cell, "hog_vs_idle": round(ratio, 2)})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", choices=("tiny", "vit-b-32"), default="tiny")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    p.add_argument("--out", type=Path, help="write the rows and the summary here as JSON")
    args = p.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not chosen or not set(chosen) <= set(VARIANTS):
        p.error(f"--variants: some of {', '.join(VARIANTS)}, got {args.variants!r}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.backbone == "tiny":
            backend, seconds = prepare_backend("tiny", "tiny", TASKS), 8.0
        else:
            ref = random_checkpoint(VIT_B, Path(tmp) / "vit-b-32-random.safetensors")
            backend, seconds = prepare_backend(args.backbone, ref, TASKS), 15.0
        cfg = ServeBenchConfig(images=default_images(), requests=300, max_seconds=seconds)
        server_args = ("--backbone", backend.backbone, "--log-level", "warning")
        for name in chosen:
            env = {"CLIPBANK_ADMIN_TOKEN": TOKEN, **VARIANTS[name]}
            with server_process(Path(tmp) / name, server_args, env) as (url, _):
                rows += _rows_of(url, backend, cfg, name, args.rounds)
    result = {"backbone": args.backbone, "rows": rows, "summary": summary(rows)}
    for s in result["summary"]:
        print(
            f"{s['variant']:19s} {s['mode']:9s} idle {s['idle']['images_per_s']:6.1f} img/s (p99 "
            f"{s['idle']['p99_ms']:7.1f} ms)  beside a busy process {s['hog']['images_per_s']:6.1f} img/s (p99 "
            f"{s['hog']['p99_ms']:7.1f} ms)  ratio {s['hog_vs_idle']:.2f}"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
